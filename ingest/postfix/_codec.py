"""The milter protocol (version 6, as Sendmail's libmilter and Postfix speak it), the part a
read-only filter needs: framing, option negotiation with macro requests, and the decoding of
the MTA's commands. No modification or rejection action is ever negotiated.

A packet is ``u32 length (big-endian, counting the command byte) | command | data``; strings
in the data are NUL-terminated.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

VERSION = 6
# Packets from an MTA are small (a header, an address, a macro list); anything bigger is not
# a milter talking, and is refused before it is buffered.
MAX_PACKET = 1024 * 1024

_LEN = struct.Struct(">I")
_OPTNEG = struct.Struct(">III")

# Commands (MTA -> filter).
ABORT, BODY, CONNECT, MACRO, BODYEOB, HELO = b"A", b"B", b"C", b"D", b"E", b"H"
QUIT_NC, HEADER, MAIL, EOH, OPTNEG, QUIT = b"K", b"L", b"M", b"N", b"O", b"Q"
RCPT, DATA, UNKNOWN = b"R", b"T", b"U"

# Replies (filter -> MTA).
CONTINUE = b"c"

# Actions (SMFIF_*): only the right to ask for macros.
SMFIF_SETSYMLIST = 0x100

# Protocol steps (SMFIP_*).
SMFIP_NOCONNECT = 0x1
SMFIP_NOHELO = 0x2
SMFIP_NOMAIL = 0x4
SMFIP_NORCPT = 0x8
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000

# Skipped: the body, end of headers, DATA and unknown commands. Every other step is answered
# at once: the no-reply flags (SMFIP_NR_*) were measured slower, not faster — Postfix then
# sends commands as small writes nobody answers, Nagle on its side waits for our delayed ACK,
# and DATA took ~45 ms instead of ~3 ms (a reply carries the ACK at once).
WANTED_PROTOCOL = SMFIP_NOBODY | SMFIP_NOEOH | SMFIP_NOUNKNOWN | SMFIP_NODATA
# Commands that need no reply once their no-reply flag is negotiated.
NO_REPLY_FLAG = {
    CONNECT: SMFIP_NR_CONN,
    HELO: SMFIP_NR_HELO,
    MAIL: SMFIP_NR_MAIL,
    RCPT: SMFIP_NR_RCPT,
    HEADER: SMFIP_NR_HDR,
}

# Macro stages (SMFIM_*) and what is asked at each: the client address at connect, the TLS
# version once HELO (and STARTTLS) is done, the queue id at MAIL and again
# at end of message (Postfix may assign it late). Nothing else: no AUTH name, no hostnames.
STAGE_CONNECT, STAGE_HELO, STAGE_ENVFROM, STAGE_ENVRCPT, STAGE_DATA, STAGE_EOM, STAGE_EOH = range(7)
MACROS: dict[int, str] = {
    STAGE_CONNECT: "{client_addr}",
    STAGE_HELO: "{tls_version}",
    STAGE_ENVFROM: "i",
    STAGE_EOM: "i",
}


class ProtocolError(ValueError):
    """Bytes that are not the milter protocol: the connection is closed."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    version: int
    protocol: int  # the steps and no-reply flags both sides agreed on


def packet(command: bytes, data: bytes = b"") -> bytes:
    return _LEN.pack(len(data) + 1) + command + data


def split_packets(buffer: bytearray) -> Iterator[tuple[bytes, bytes]]:
    """Take every whole packet off the front of ``buffer`` as (command, data)."""
    while len(buffer) >= 4:
        (length,) = _LEN.unpack_from(buffer)
        if length < 1 or length > MAX_PACKET:
            raise ProtocolError(f"packet length {length} out of range")
        if len(buffer) < 4 + length:
            return
        command, data = bytes(buffer[4:5]), bytes(buffer[5 : 4 + length])
        del buffer[: 4 + length]
        yield command, data


def negotiate(data: bytes) -> tuple[Negotiated, bytes]:
    """The MTA's OPTNEG offer -> what was agreed, and the OPTNEG reply packet (our steps,
    no actions but the macro requests, and the macro lists)."""
    if len(data) < _OPTNEG.size:
        raise ProtocolError("short option negotiation")
    version, actions, offered = _OPTNEG.unpack_from(data)
    if version < 2:
        raise ProtocolError(f"milter protocol version {version} is not supported")
    version = min(version, VERSION)
    # Only steps the MTA offers may be asked for (a v2 MTA offers none of the no-reply flags).
    protocol = WANTED_PROTOCOL & offered
    reply_actions = actions & SMFIF_SETSYMLIST if version >= 6 else 0
    body = _OPTNEG.pack(version, reply_actions, protocol)
    if reply_actions:
        for stage, names in MACROS.items():
            body += _LEN.pack(stage) + names.encode("ascii") + b"\0"
    return Negotiated(version, protocol), packet(OPTNEG, body)


def needs_reply(command: bytes, agreed: Negotiated) -> bool:
    """Whether the MTA waits for an answer to ``command``."""
    if command in (MACRO, ABORT, QUIT, QUIT_NC, OPTNEG):
        return False  # OPTNEG is answered by negotiate()
    flag = NO_REPLY_FLAG.get(command)
    return flag is None or not agreed.protocol & flag


def strings(data: bytes) -> list[bytes]:
    """The NUL-terminated strings of a packet (a missing final NUL is tolerated)."""
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return parts


def macros(data: bytes) -> dict[str, str]:
    """A MACRO packet's ``{name: value}`` (after its command byte)."""
    parts = strings(data[1:])
    out: dict[str, str] = {}
    for i in range(0, len(parts) - 1, 2):
        name = parts[i].decode("ascii", "replace").strip()
        if name.startswith("{") and name.endswith("}"):
            name = name[1:-1]
        out[name] = parts[i + 1].decode("utf-8", "replace")
    return out


@dataclass(frozen=True, slots=True)
class Connect:
    hostname: str
    family: str  # "4", "6", "L" (local socket), "U" (unknown)
    address: str | None


def connect(data: bytes) -> Connect:
    host, sep, rest = data.partition(b"\0")
    if not sep or not rest:
        raise ProtocolError("malformed connect")
    family = chr(rest[0])
    address: str | None = None
    if family in "46" and len(rest) >= 3:
        address = rest[3:].split(b"\0", 1)[0].decode("ascii", "replace") or None
    return Connect(host.decode("utf-8", "replace"), family, address)


def header(data: bytes) -> tuple[bytes, bytes]:
    """(name, value) of a HEADER packet; the value as the MTA sent it (bytes)."""
    parts = data.split(b"\0")
    if len(parts) < 2:
        raise ProtocolError("malformed header")
    return parts[0], parts[1]
