"""`mailmeta maillog`: follow Postfix's log file (``maillog_file``) or standard input, and
record the status events its lines name (see ``_maillog``) like the front end records its own.

Position: a file (JSON, fsync'd, replaced atomically) holding the log file's inode and the
offset after the last line whose events are recorded, the queue ids in flight, and the batch
being recorded. A batch is written there *before* it goes to the broker: after a SIGKILL the
same records (same event ids) are sent again instead of re-read lines minting new ones, so no
line is skipped and no event is doubled (a record the broker had already taken arrives twice
with one event id, which the store keeps once).

Rotation: a renamed log is read to its end before the new file is opened (also across a
restart: the old inode is looked for beside the path); a truncated one is read again from 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from mailmeta import schema
from mailmeta.config import Customers, Settings
from mailmeta.ingest.postfix._maillog import LogParser
from mailmeta.ingest.postfix._recorder import Recorder

log = logging.getLogger("mailmeta.ingest.maillog")

POLL = 0.2
BATCH_BYTES = 256 * 1024


class Position:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.inode: int | None = None
        self.offset = 0
        self.state: dict[str, Any] = {}
        self.inflight: list[str] = []  # encoded events not yet known to be recorded

    def load(self) -> None:
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        self.inode, self.offset = data.get("inode"), int(data.get("offset", 0))
        self.state, self.inflight = data.get("state", {}), data.get("inflight", [])

    def save(self) -> None:
        data = orjson.dumps(
            {
                "inode": self.inode,
                "offset": self.offset,
                "state": self.state,
                "inflight": self.inflight,
            }
        )
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _find_inode(directory: Path, inode: int) -> Path | None:
    """The rotated log (renamed in the same directory) that still has ``inode``."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.is_file(follow_symlinks=False) and entry.inode() == inode:
                return Path(entry.path)
    return None


class MaillogFollower:
    def __init__(
        self,
        settings: Settings,
        customers: Customers,
        *,
        path: Path | None,
        position: Path | None = None,
        poll: float = POLL,
    ) -> None:
        if customers.region != settings.region:
            customers = customers.serving(settings.region)
        self.path = path
        self.parser = LogParser(customers)
        self.recorder = Recorder(settings, customers, "maillog")
        self.position = Position(position) if position is not None else None
        self.poll = poll
        self.stopping = asyncio.Event()

    async def _record(self, events: list[str]) -> None:
        """Until recorded (broker or spool): a batch is never dropped nor skipped."""
        backoff = 0.5
        decoded = [schema.decode_event(e) for e in events]
        while True:
            failure = await self.recorder.record(decoded)
            if failure is None:
                return
            log.warning("maillog: events not recorded yet: %s", failure)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _lines(self, lines: list[bytes], offset: int, inode: int | None) -> None:
        events: list[str] = []
        for raw in lines:
            for ev in self.parser.feed(raw.decode("utf-8", "replace")):
                events.append(schema.encode_event(ev).decode())
        pos = self.position
        if pos is not None:
            pos.inode, pos.offset, pos.state = inode, offset, self.parser.state()
            pos.inflight = events
            await asyncio.to_thread(pos.save)
        if events:
            await self._record(events)
            if pos is not None:
                pos.inflight = []
                await asyncio.to_thread(pos.save)

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        await self.recorder.start()
        try:
            if self.path is None:
                await self._follow_stdin()
            else:
                await self._follow_file(self.path)
        finally:
            await self.recorder.aclose()

    async def _follow_stdin(self) -> None:
        while not self.stopping.is_set():
            line = await asyncio.to_thread(sys.stdin.buffer.readline)
            if not line:
                return
            await self._lines([line], 0, None)

    async def _wait(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), self.poll)

    async def _follow_file(self, path: Path) -> None:
        pos = self.position
        start_inode, offset = None, 0
        if pos is not None:
            await asyncio.to_thread(pos.load)
            self.parser.load(pos.state)
            if pos.inflight:
                log.info("maillog: recording %d event(s) of the batch in flight at the last stop",
                         len(pos.inflight))  # fmt: skip
                await self._record(pos.inflight)
                pos.inflight = []
                await asyncio.to_thread(pos.save)
            start_inode, offset = pos.inode, pos.offset
        if start_inode is not None:
            # Rotated while we were away: finish the old file first.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino != start_inode:
                    old = _find_inode(path.parent, start_inode)
                    if old is not None:
                        await self._drain(old, offset)
                    offset = 0
        while not self.stopping.is_set():
            try:
                # A local file: opening it does not block the loop for long.
                f = open(path, "rb")  # noqa: ASYNC230
            except FileNotFoundError:
                await self._wait()
                continue
            with f:
                inode = os.fstat(f.fileno()).st_ino
                if inode != start_inode:
                    offset = 0
                start_inode = inode
                offset = await self._tail(f, path, inode, offset)
            # _tail returns when the path names a new file: begin it at 0.
            start_inode, offset = None, 0

    async def _drain(self, old: Path, offset: int) -> None:
        with open(old, "rb") as f:  # noqa: ASYNC230  (a local file)
            inode = os.fstat(f.fileno()).st_ino
            f.seek(offset)
            await self._read_available(f, inode, offset)

    async def _read_available(self, f: Any, inode: int, offset: int) -> int:
        """Every whole line from ``offset`` to the end now; returns the new offset."""
        while True:
            f.seek(offset)
            data = f.read(BATCH_BYTES)
            end = data.rfind(b"\n")
            if end < 0:
                return offset
            chunk = data[: end + 1]
            offset += len(chunk)
            await self._lines(chunk.splitlines(), offset, inode)
            if len(data) < BATCH_BYTES:
                return offset

    async def _tail(self, f: Any, path: Path, inode: int, offset: int) -> int:
        while not self.stopping.is_set():
            if os.fstat(f.fileno()).st_size < offset:
                offset = 0  # truncated in place
            offset = await self._read_available(f, inode, offset)
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current != inode:
                # Renamed away: what was written to it before the switch is read first.
                offset = await self._read_available(f, inode, offset)
                if current is not None:
                    return offset
            await self._wait()
        return offset
