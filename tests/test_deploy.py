"""deploy/ files name only settings and stage modules that exist (no Docker engine here)."""

from __future__ import annotations

import importlib.util

import yaml

from mailmeta.config import Settings
from tests.conftest import REPO


def test_compose_file_matches_settings_and_stages() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    known = {f"MAILMETA_{name.upper()}" for name in Settings.model_fields}
    stages = {
        "sink": "mailmeta.service",
        "streams": "mailmeta.streams",
        "ingest": "mailmeta.ingest",
    }
    for service, module in stages.items():
        spec = compose["services"][service]
        assert spec["command"] == ["python", "-m", module]
        assert importlib.util.find_spec(module + ".__main__") is not None
        unknown = set(spec["environment"]) - known
        assert not unknown, f"{service}: unknown settings {unknown}"
        # The settings must parse as mailmeta would read them.
        env = {k.removeprefix("MAILMETA_").lower(): v for k, v in spec["environment"].items()}
        s = Settings(**env)
        assert s.resolved_dsn().startswith("http://")
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert "pip install" in dockerfile and "USER mailmeta" in dockerfile
