"""What `mailmeta up` leaves on disk: everything under its data dir, owner-only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.up_helpers import mailmeta_up, send_smtplib

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.kafka]


def _open_to_others(root: Path) -> list[str]:
    """Every file or directory under ``root`` (itself included) that its group or other
    users may read, write or enter."""
    found = []
    for path in [root, *root.rglob("*")]:
        try:
            st = path.lstat()
        except FileNotFoundError:  # a part removed it meanwhile (a merged ClickHouse part)
            continue
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_mode & 0o077:
            found.append(f"{oct(stat.S_IMODE(st.st_mode))} {path.relative_to(root)}")
    return found


def test_up_writes_only_under_its_data_dir_and_only_for_its_owner(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    data = tmp_path / "data"
    # The data dir left open by an earlier version: start closes it.
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    old_umask = os.umask(0o022)  # what the operator's shell usually has
    try:
        with mailmeta_up(data, cwd=cwd) as up:
            send_smtplib(up.smtp_port, "canary-modes")
            up.wait_messages(1, timeout=60)
            # Each part has written its files by now (the raw topic's log, ClickHouse parts,
            # the worker's datadir, logs): look while they run, and again after the stop.
            during = _open_to_others(data)
    finally:
        os.umask(old_umask)
    assert not during, "readable by others while running:\n" + "\n".join(during)
    after = _open_to_others(data)
    assert not after, "readable by others after the stop:\n" + "\n".join(after)
    assert (data / "clickhouse").is_dir() and (data / "kafka").is_dir()
    assert list(cwd.iterdir()) == [], "written outside the data dir"
    assert (data / "streams").is_dir()  # the redaction worker's datadir, not the cwd
