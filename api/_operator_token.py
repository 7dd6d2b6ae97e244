"""The operator token file: the bootstrap token `mailmeta up` and the service hand over."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mailmeta.api._principals import SCOPES
from mailmeta.api._token_authority import TokenAuthority

log = logging.getLogger("mailmeta.api.auth")

OPERATOR_TOKEN_NAME = "operator"


def ensure_operator_token(authority: TokenAuthority, path: Path) -> bool:
    """Make ``path`` hold a working operator token; True when a new one was written.

    Keeps the file when its token still works. Otherwise creates an operator token (all
    customers, all scopes) and writes it with mode 0600 — never to logs, env or argv.
    """
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing and authority.verify(existing) is not None:
        return False
    _, token = authority.create(OPERATOR_TOKEN_NAME, None, SCOPES)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    log.info("operator API token written to %s", path)
    return True
