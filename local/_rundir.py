"""One `mailmeta up` per data dir, and no process of a dead run left holding it.

The lock is an ``flock`` on ``<data_dir>/up.lock``: the kernel releases it when its holder dies,
however it dies, so a lock left by a crash is never mistaken for a live run. Each part's PID is
recorded in ``<data_dir>/run/<name>.pid`` with the process's start time; after an unclean stop
a part that outlived its supervisor is stopped before anything binds its ports again — only if
its PID still names the same process (start time) and that process runs on this data dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from pathlib import Path


class DataDirBusy(RuntimeError):
    """Another `mailmeta up` holds this data dir."""


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    return stat.rsplit(")", 1)[1].split()[19]


def _mentions(pid: int, needle: str) -> bool:
    """Whether the process's command line or environment names ``needle`` (the data dir)."""
    for name in ("cmdline", "environ"):
        with contextlib.suppress(OSError):
            if needle.encode() in Path(f"/proc/{pid}/{name}").read_bytes():
                return True
    return False


class RunDir:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.pid_dir = self.data_dir / "run"
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Hold the data dir for this process, or raise DataDirBusy naming the holder."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / "up.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirBusy(
                f"another mailmeta up (pid {holder}) is running on {self.data_dir}; "
                "stop it first or use another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def record(self, name: str, pid: int) -> None:
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        (self.pid_dir / f"{name}.pid").write_text(f"{pid} {_start_time(pid) or ''}\n")

    def forget(self, name: str) -> None:
        (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)

    def stop_leftovers(self, timeout: float = 10.0) -> list[str]:
        """Stop parts of a dead run still alive (SIGTERM, then SIGKILL at ``timeout``).

        Call with the lock held. Returns what was stopped, for the log.
        """
        stopped = []
        for path in sorted(self.pid_dir.glob("*.pid")) if self.pid_dir.exists() else []:
            fields = path.read_text().split()
            path.unlink(missing_ok=True)
            if not fields or not fields[0].isdigit():
                continue
            pid, started = int(fields[0]), fields[1] if len(fields) > 1 else None
            if _start_time(pid) != started or not _mentions(pid, str(self.data_dir)):
                continue  # gone, or the PID now names another process: not ours to stop
            _terminate(pid, timeout)
            stopped.append(f"{path.stem} (pid {pid})")
        return stopped


def _terminate(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _start_time(pid) is None or _is_zombie(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _start_time(pid) is not None and not _is_zombie(pid):
        time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
