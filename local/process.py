"""Child processes and loopback ports: what `mailmeta up`, the local brokers, the tests and the
benchmarks need to start a process, know when it is ready and stop it by PID.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, BinaryIO

__all__ = ["Spawned", "die_with_parent", "free_port", "free_ports", "stop_process"]


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the thread that started it dies (Linux only)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _bound(port: int) -> socket.socket:
    # No SO_REUSEADDR: a port still held in TIME_WAIT is not handed out (Tansu could not bind it).
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        raise
    return s


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that are free now (all held open together, so none is
    handed out twice)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(_bound(0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(*offsets: int, attempts: int = 50) -> int:
    """A loopback port ``p`` free now; with ``offsets``, ``p + offset`` is free too for each
    (a server that binds base + index, the next region's cell)."""
    for _ in range(attempts):
        socks: list[socket.socket] = []
        try:
            socks.append(_bound(0))
            port = int(socks[0].getsockname()[1])
            for offset in offsets:
                if not 0 < port + offset < 65536:
                    break
                socks.append(_bound(port + offset))
            else:
                return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no free loopback port p with p + {offsets} free as well")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return _wait_or_kill(proc, timeout)


def _wait_or_kill(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


class Spawned:
    """A child process whose output (stdout and stderr) a thread reads line by line, into
    ``log`` (appended) and to ``on_line``; it is ready once a line contains ``ready_text``.

    ``own_session``: the child has its own session (a Ctrl-C in the terminal reaches only us,
    which then stops it in order) and gets SIGTERM if we die without stopping it.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        ready_text: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log: Path | None = None,
        on_line: Callable[[str], None] | None = None,
        own_session: bool = False,
    ) -> None:
        self.ready_text = ready_text.encode()
        self.ready = threading.Event()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=own_session,
            preexec_fn=die_with_parent if own_session else None,
        )
        assert self.proc.stdout is not None
        self._pump = threading.Thread(
            target=self._read, args=(self.proc.stdout, log, on_line), daemon=True
        )
        self._pump.start()

    def _read(
        self, stream: IO[bytes], log: Path | None, on_line: Callable[[str], None] | None
    ) -> None:
        sink: BinaryIO | None = open(log, "ab") if log is not None else None
        try:
            for line in iter(stream.readline, b""):
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                if on_line is not None:
                    on_line(line.decode("utf-8", "replace"))
                if not self.ready.is_set() and self.ready_text in line:
                    self.ready.set()
        finally:
            if sink is not None:
                sink.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float) -> bool:
        """Until the ready line (True), or the child exited or ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.wait(0.1):
                return True
            if not self.alive():
                return self.ready.is_set()
        return False

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float, *, pump_timeout: float = 1.0) -> int:
        """Wait up to ``timeout`` s for the exit, then SIGKILL; the exit code."""
        code = _wait_or_kill(self.proc, timeout)
        self._pump.join(pump_timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def stop(self, timeout: float = 15.0, *, pump_timeout: float = 1.0) -> int:
        """SIGTERM, then :meth:`wait_stopped`."""
        self.terminate()
        return self.wait_stopped(timeout, pump_timeout=pump_timeout)
