"""The durable spool: events the broker could not take in time, on local disk, replayed in
order once it is back.

Append-only segment files ``seg-NNNNNNNNNNNN.log`` of framed records
``0xA5 | u32 length | u32 crc32 | u16 key length | key | value`` (key = the event id, value
= the encoded event: metadata only, never a body). ``store()`` returns only after the
records are written and fsync'd (group commit: concurrent stores share one fsync), so a 250
given after it survives a crash. A torn tail (a crash mid-write, never answered 250) fails
its CRC and is cut off at start. Replay re-sends the stored bytes, so event ids are never
re-minted; a segment is deleted once every record in it has been acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mailmeta.ingest.spool")

_MAGIC = 0xA5
_HEAD = struct.Struct(">BII")
_KEYLEN = struct.Struct(">H")
SEGMENT_BYTES = 4 * 1024 * 1024
_READ_CHUNK = 1024 * 1024

Record = tuple[bytes, bytes]


class SpoolFull(Exception):
    """The spool has no room: the client must keep the message (451)."""


def encode_frame(key: bytes, value: bytes) -> bytes:
    payload = _KEYLEN.pack(len(key)) + key + value
    return _HEAD.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_frames(data: bytes, start: int = 0) -> tuple[list[tuple[int, bytes, bytes]], int]:
    """Whole, intact frames from ``data[start:]`` as (end offset, key, value); and the offset
    where the intact part ends (a torn or corrupt frame stops the scan)."""
    out: list[tuple[int, bytes, bytes]] = []
    pos, n = start, len(data)
    while pos + _HEAD.size <= n:
        magic, length, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length
        if magic != _MAGIC or end > n or length < _KEYLEN.size:
            break
        payload = data[pos + _HEAD.size : end]
        if zlib.crc32(payload) != crc:
            break
        (klen,) = _KEYLEN.unpack_from(payload)
        if _KEYLEN.size + klen > length:
            break
        key = payload[_KEYLEN.size : _KEYLEN.size + klen]
        out.append((end, key, payload[_KEYLEN.size + klen :]))
        pos = end
    return out, pos


@dataclass
class _Segment:
    path: Path
    size: int  # bytes written and fsync'd (the replayable end)
    records: int


class Spool:
    """One process's spool directory. All methods run on one event loop; only the blocking
    write+fsync goes to a thread."""

    def __init__(
        self, directory: Path, max_bytes: int, *, segment_bytes: int = SEGMENT_BYTES
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._segments: list[_Segment] = []
        self._next_seq = 0
        self._writer_fd: int | None = None  # fd of self._segments[-1] while it takes writes
        self._read_seg = 0  # index into _segments
        self._read_off = 0
        self._pending = 0  # stored records not yet replayed
        self._bytes = 0  # bytes on disk, incl. replayed parts of live segments
        self._buf: list[bytes] = []
        self._buf_records = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self.has_pending = asyncio.Event()

    # -- opening ---------------------------------------------------------------------------

    def open(self) -> int:
        """Lock the directory and load what an earlier run left; returns pending records."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise RuntimeError(f"spool {self.directory} is in use by another process") from None
        for path in sorted(self.directory.glob("seg-*.log")):
            seq = int(path.stem.split("-", 1)[1])
            self._next_seq = max(self._next_seq, seq + 1)
            data = path.read_bytes()
            frames, good = decode_frames(data)
            if good < len(data):
                # A torn tail from a crash mid-write: never acknowledged to a client.
                log.warning("spool %s: cutting %d torn byte(s)", path.name, len(data) - good)
                with open(path, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
            if not frames:
                path.unlink()
                continue
            self._segments.append(_Segment(path, good, len(frames)))
            self._pending += len(frames)
            self._bytes += good
        if self._pending:
            self.has_pending.set()
        return self._pending

    # -- state -----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records stored (or being stored) and not yet replayed."""
        return self._pending + self._buf_records

    @property
    def bytes_on_disk(self) -> int:
        return self._bytes

    @property
    def active(self) -> bool:
        """True while anything is spooled or being spooled: new events must queue behind it
        to keep their order."""
        return self._pending > 0 or self._buf_records > 0 or self._flusher is not None

    # -- storing ---------------------------------------------------------------------------

    async def store(self, records: Sequence[Record]) -> None:
        """Return once ``records`` are on disk (fsync'd); SpoolFull or OSError otherwise."""
        frames = [encode_frame(k, v) for k, v in records]
        size = sum(len(f) for f in frames)
        if self.max_bytes and self._bytes + size > self.max_bytes:
            raise SpoolFull(f"spool full ({self._bytes} of {self.max_bytes} bytes)")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._buf.extend(frames)
        self._buf_records += len(frames)
        self._bytes += size
        self._waiters.append(fut)
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        await fut

    async def _flush(self) -> None:
        try:
            while self._buf:
                frames, self._buf = self._buf, []
                count, self._buf_records = self._buf_records, 0
                waiters, self._waiters = self._waiters, []
                data = b"".join(frames)
                new_file = self._writer_fd is None or self._segments[-1].size >= self.segment_bytes
                try:
                    if new_file:
                        self._open_segment()
                    assert self._writer_fd is not None
                    await asyncio.to_thread(
                        _write_sync, self._writer_fd, data, new_file, self.directory
                    )
                except OSError as exc:
                    log.error("spool write failed: %s", exc.strerror or type(exc).__name__)
                    self._bytes -= len(data)
                    # A partial write leaves garbage: never append behind it.
                    self._close_writer()
                    for w in waiters:
                        if not w.done():
                            w.set_exception(OSError(exc.errno, "spool write failed"))
                    continue
                seg = self._segments[-1]
                seg.size += len(data)
                seg.records += count
                self._pending += count
                self.has_pending.set()
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
        finally:
            self._flusher = None

    def _open_segment(self) -> None:
        self._close_writer()
        path = self.directory / f"seg-{self._next_seq:012d}.log"
        self._next_seq += 1
        self._writer_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segments.append(_Segment(path, 0, 0))

    def _close_writer(self) -> None:
        if self._writer_fd is not None:
            os.close(self._writer_fd)
            self._writer_fd = None

    # -- replaying -------------------------------------------------------------------------

    def read_batch(self, max_records: int) -> tuple[list[Record], tuple[int, int]]:
        """The next records in order (durable ones only) and the position after them."""
        seg_i, off = self._read_seg, self._read_off
        while seg_i < len(self._segments):
            seg = self._segments[seg_i]
            if off < seg.size:
                with open(seg.path, "rb") as f:
                    f.seek(off)
                    data = f.read(min(seg.size - off, _READ_CHUNK))
                    if len(data) < seg.size - off and not decode_frames(data)[0]:
                        data += f.read(seg.size - off - len(data))  # one frame > a chunk
                frames, _ = decode_frames(data)
                frames = frames[:max_records]
                if not frames:  # cannot happen for fsync'd data; never spin on it
                    raise RuntimeError(f"spool {seg.path.name}: unreadable at offset {off}")
                return [(k, v) for _, k, v in frames], (seg_i, off + frames[-1][0])
            if seg_i == len(self._segments) - 1:
                break
            seg_i, off = seg_i + 1, 0
        return [], (seg_i, off)

    def commit(self, position: tuple[int, int], count: int) -> None:
        """``count`` records up to ``position`` were acknowledged by the broker."""
        self._read_seg, self._read_off = position
        self._pending -= count
        # Segments wholly behind the read position are done.
        while self._read_seg > 0 or (
            self._segments
            and self._read_off >= self._segments[0].size
            and (self._writer_fd is None or len(self._segments) > 1)
        ):
            seg = self._segments.pop(0)
            if self._read_seg > 0:
                self._read_seg -= 1
            else:
                self._read_off = 0
            self._bytes -= seg.size
            with contextlib.suppress(FileNotFoundError):
                seg.path.unlink()
        if self._pending == 0 and self._flusher is None and self._segments:
            # Caught up: retire the writer's segment too, so an idle spool is empty on disk.
            last = self._segments[-1]
            if self._read_seg == len(self._segments) - 1 and self._read_off >= last.size:
                self._close_writer()
                self._segments.pop()
                self._bytes -= last.size
                self._read_seg, self._read_off = 0, 0
                with contextlib.suppress(FileNotFoundError):
                    last.path.unlink()
        if self._pending == 0 and not self._buf_records:
            self.has_pending.clear()

    async def aclose(self) -> None:
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        self._close_writer()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _write_sync(fd: int, data: bytes, new_file: bool, directory: Path) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)
    if new_file:
        # The new file's directory entry must be durable too, or a crash could lose it.
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


async def replay_forever(
    spool: Spool,
    deliver: Callable[[Sequence[Record]], Awaitable[None]],
    *,
    ready: Callable[[], bool],
    skip: set[bytes],
    batch: int = 500,
    on_replayed: Callable[[int], None] | None = None,
) -> None:
    """Send spooled records to the broker in order, forever (cancel to stop).

    ``ready()`` is False while records produced directly are still in the producer's hands:
    replay waits for them to be acknowledged or to time out, so the same event is not sent
    twice. ``skip`` holds ids of spooled events that such a late acknowledgement did land.
    """
    backoff = 0.25
    while True:
        await spool.has_pending.wait()
        if not ready():
            await asyncio.sleep(0.2)
            continue
        records, position = spool.read_batch(batch)
        if not records:
            await asyncio.sleep(0.05)  # the flusher is between write and bookkeeping
            continue
        todo = [r for r in records if r[0] not in skip]
        try:
            if todo:
                await deliver(todo)
        except Exception as exc:
            log.info("spool replay waiting for the broker: %s", exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            continue
        backoff = 0.25
        for key, _ in records:
            skip.discard(key)
        spool.commit(position, len(records))
        if on_replayed is not None:
            on_replayed(len(todo))
