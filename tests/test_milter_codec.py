"""The milter protocol codec (ingest/postfix/_codec.py) on hand-built packets: framing,
negotiation and decoding. The real-Postfix conversation is in test_postfix_milter.py."""

from __future__ import annotations

import struct

import pytest

from mailmeta.ingest.postfix import _codec as mc

# What Postfix 3.7 offers (milter8.c): version 6, every action, every protocol step.
POSTFIX_ACTIONS = 0x1FF
POSTFIX_PROTOCOL = 0x1FFFFF


def test_split_packets_takes_whole_packets_and_keeps_a_partial_one() -> None:
    data = mc.packet(b"H", b"client.example\0") + mc.packet(b"Q")
    buf = bytearray(data + mc.packet(b"M", b"<a@b>\0")[:5])
    assert list(mc.split_packets(buf)) == [(b"H", b"client.example\0"), (b"Q", b"")]
    assert len(buf) == 5  # the partial packet waits for its rest
    buf += mc.packet(b"M", b"<a@b>\0")[5:]
    assert list(mc.split_packets(buf)) == [(b"M", b"<a@b>\0")]
    assert not buf


@pytest.mark.parametrize("length", [0, mc.MAX_PACKET + 1])
def test_a_length_out_of_range_is_a_protocol_error(length: int) -> None:
    with pytest.raises(mc.ProtocolError):
        list(mc.split_packets(bytearray(struct.pack(">I", length) + b"X")))


def test_negotiation_asks_no_action_skips_the_body_and_requests_the_macros() -> None:
    agreed, reply = mc.negotiate(struct.pack(">III", 6, POSTFIX_ACTIONS, POSTFIX_PROTOCOL))
    [(command, data)] = list(mc.split_packets(bytearray(reply)))
    assert command == mc.OPTNEG
    version, actions, protocol = struct.unpack_from(">III", data)
    assert version == 6
    assert actions == mc.SMFIF_SETSYMLIST  # no add/change/delete/quarantine, ever
    assert protocol & mc.SMFIP_NOBODY and protocol & mc.SMFIP_NODATA
    assert not protocol & mc.SMFIP_NOHDRS and not protocol & mc.SMFIP_NORCPT
    requested, rest = {}, data[12:]
    while rest:
        (stage,) = struct.unpack_from(">I", rest)
        names, _, rest = rest[4:].partition(b"\0")
        requested[stage] = names.decode()
    assert requested == mc.MACROS
    assert agreed.protocol == protocol
    # Every step it takes part in is answered (see WANTED_PROTOCOL); macros never are.
    assert mc.needs_reply(mc.HEADER, agreed) and mc.needs_reply(mc.BODYEOB, agreed)
    assert not mc.needs_reply(mc.MACRO, agreed)
    # An MTA that agreed to no-reply steps is not answered for them.
    nr = mc.Negotiated(6, mc.SMFIP_NR_HDR)
    assert not mc.needs_reply(mc.HEADER, nr) and mc.needs_reply(mc.RCPT, nr)


def test_negotiation_with_an_old_mta_asks_only_what_it_offers() -> None:
    agreed, reply = mc.negotiate(struct.pack(">III", 2, 0x3F, 0x7F))
    _, data = next(mc.split_packets(bytearray(reply)))
    version, actions, protocol = struct.unpack(">III", data)
    assert (version, actions) == (2, 0)
    assert protocol == mc.WANTED_PROTOCOL & 0x7F
    assert mc.needs_reply(mc.HEADER, agreed)


def test_decoding_connect_macros_and_headers() -> None:
    c = mc.connect(b"client.example\x004\x30\x39192.0.2.7\0")
    assert (c.hostname, c.family, c.address) == ("client.example", "4", "192.0.2.7")
    assert mc.connect(b"localhost\0L\0\0/run/sock\0").address is None
    assert mc.macros(b"M{i}\0ABC123\0{tls_version}\0TLSv1.3\0") == {
        "i": "ABC123",
        "tls_version": "TLSv1.3",
    }
    assert mc.header(b"Subject\0hello\n\tworld\0") == (b"Subject", b"hello\n\tworld")
    with pytest.raises(mc.ProtocolError):
        mc.header(b"no-nul")
    with pytest.raises(mc.ProtocolError):
        mc.negotiate(b"\0\0\0\6")
