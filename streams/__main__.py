"""``python -m mailmeta.streams``: run one redaction worker (settings from MAILMETA_* env)."""

from __future__ import annotations

import sys

from mailmeta.config import Settings
from mailmeta.kafka import KafkaConfigError, check_connection
from mailmeta.streams.app import create_app


def main() -> None:
    settings = Settings()
    try:
        check_connection(settings, timeout=5.0)  # refused credentials: fail now, say which
    except KafkaConfigError as exc:
        sys.exit(f"mailmeta streams: {exc}")
    app = create_app(settings)
    # --without-web: faust binds a web port even with web_enabled=False (DESIGN.md).
    sys.argv = [
        sys.argv[0],
        "--loop",
        "uvloop",
        "worker",
        "-l",
        settings.log_level,
        "--without-web",
    ]
    app.main()


if __name__ == "__main__":
    main()
