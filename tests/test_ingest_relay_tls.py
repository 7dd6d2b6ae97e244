"""STARTTLS to the next hop in relay mode: opportunistic by default, required for customers
with require_tls, certificate verification settable; real SMTP conversations with the front
end and real next hops (aiosmtpd on loopback, with and without STARTTLS)."""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest

from mailmeta.config import Customers, Settings, load_customers
from mailmeta.ingest._tls import self_signed, server_context
from mailmeta.ingest.server import relay_tls_context
from tests.smtp_helpers import TlsNextHop, message, read_events, running_server, write_customers

QUEUED = "250 2.0.0 Ok: queued as NEXTHOP1"


def _customers(tmp_path: Path, hops: dict[str, tuple[str, bool]]) -> Customers:
    """One customer per entry: id -> (its next hop, require_tls); domain ``<id>.example``."""
    return load_customers(
        write_customers(
            tmp_path / "customers.yaml",
            [
                {
                    "id": cid,
                    "domains": [f"{cid}.example"],
                    "retention_days": 30,
                    "relay_to": hop,
                    "require_tls": required,
                }
                for cid, (hop, required) in hops.items()
            ],
        )
    )


def _hop_tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    cert, key = self_signed(tmp_path / "hop-tls", "nexthop.test")
    return server_context(cert, key), cert


def _front_tls(tmp_path: Path) -> ssl.SSLContext:
    return server_context(*self_signed(tmp_path / "front-tls", "mx.mailmeta.test"))


def _send(port: int, rcpt: str, subject: str) -> tuple[int, str]:
    """One message over STARTTLS to the front end (require_tls customers need it inbound);
    the front end's reply to DATA (or to RCPT, when it refuses)."""
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.example.org")
        c.starttls(context=unverified)
        c.ehlo("client.example.org")
        c.mail("bob@example.org")
        code, text = c.rcpt(rcpt)
        if code != 250:
            return code, text.decode()
        code, text = c.data(message(subject))
        return code, text.decode()


def _by_subject(settings: Settings, count: int) -> dict[str, dict[str, Any]]:
    return {e["subject"]: e for e in read_events(settings, min_count=count)}


def test_opportunistic_starttls_and_required_tls(settings: Settings, tmp_path: Path) -> None:
    hop_ctx, _ = _hop_tls(tmp_path)
    with TlsNextHop(hop_ctx) as tls_hop, TlsNextHop(None) as plain_hop:
        customers = _customers(
            tmp_path,
            {
                "open": (tls_hop.address, False),
                "plain": (plain_hop.address, False),
                "secure": (plain_hop.address, True),
                "secure2": (tls_hop.address, True),
            },
        )
        with running_server(settings, customers, tls_context=_front_tls(tmp_path)) as srv:
            assert _send(srv.port, "a@open.example", "to tls hop") == (250, QUEUED[4:])
            assert _send(srv.port, "a@plain.example", "to plain hop") == (250, QUEUED[4:])
            code, text = _send(srv.port, "a@secure.example", "required, no starttls")
            assert (code, text) == (451, "4.7.5 TLS required, but the next hop offers no STARTTLS")
            assert _send(srv.port, "a@secure2.example", "required, tls hop") == (250, QUEUED[4:])
        tls_hop_got = {
            m[1][0]: v for m, v in zip(tls_hop.received, tls_hop.tls_versions, strict=True)
        }
        plain_hop_got = {
            m[1][0]: v for m, v in zip(plain_hop.received, plain_hop.tls_versions, strict=True)
        }
    # What each next hop received, and over what.
    assert tls_hop_got == {"a@open.example": "TLSv1.3", "a@secure2.example": "TLSv1.3"}
    assert plain_hop_got == {"a@plain.example": None}  # the required one never reached it

    events = _by_subject(settings, 4)
    assert events["to tls hop"]["status"] == "delivered"
    # The outbound TLS version rides on smtp_reply; tls_version is the inbound session's.
    assert events["to tls hop"]["smtp_reply"] == f"{QUEUED} (next hop: TLSv1.3)"
    assert events["to tls hop"]["tls_version"] == "TLSv1.3"
    assert events["to plain hop"]["smtp_reply"] == QUEUED  # plaintext: the reply alone
    deferred = events["required, no starttls"]
    assert (deferred["status"], deferred["smtp_reply"]) == (
        "deferred",
        "451 4.7.5 TLS required, but the next hop offers no STARTTLS",
    )
    assert events["required, tls hop"]["status"] == "delivered"


def test_certificate_verification(settings: Settings, tmp_path: Path) -> None:
    hop_ctx, hop_cert = _hop_tls(tmp_path)
    with TlsNextHop(hop_ctx) as hop:
        customers = _customers(
            tmp_path, {"open": (hop.address, False), "secure": (hop.address, True)}
        )
        verify = settings.model_copy(update={"relay_tls_verify": True})
        # Verified against the system's CAs: the self-signed hop fails the handshake. A
        # customer requiring TLS is deferred; any other is delivered in plaintext.
        with running_server(verify, customers, tls_context=_front_tls(tmp_path)) as srv:
            code, text = _send(srv.port, "a@secure.example", "unverified, required")
            assert code == 451
            assert text == "4.7.5 TLS required, but the TLS handshake with the next hop failed"
            assert _send(srv.port, "a@open.example", "unverified, optional")[0] == 250
        assert hop.tls_versions == [None]  # the optional one, in plaintext after the failure
        # With the hop's certificate as the CA file, the same hop verifies.
        trusted = verify.model_copy(update={"relay_tls_ca_file": str(hop_cert)})
        with running_server(trusted, customers, tls_context=_front_tls(tmp_path)) as srv:
            assert _send(srv.port, "a@secure.example", "verified") == (250, QUEUED[4:])
        assert hop.tls_versions == [None, "TLSv1.3"]
    events = _by_subject(settings, 3)
    assert events["unverified, required"]["status"] == "deferred"
    assert events["unverified, optional"]["smtp_reply"] == QUEUED
    assert events["verified"]["smtp_reply"] == f"{QUEUED} (next hop: TLSv1.3)"


def test_relay_tls_settings_are_checked(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(ValueError, match=r"MAILMETA_RELAY_TLS_CA_FILE .*cannot load"):
        relay_tls_context(Settings(relay_tls_verify=True, relay_tls_ca_file=str(missing)))
    with pytest.raises(ValueError, match="MAILMETA_RELAY_TLS_VERIFY is off"):
        relay_tls_context(Settings(relay_tls_ca_file=str(missing)))
    assert relay_tls_context(Settings()).verify_mode == ssl.CERT_NONE
    assert relay_tls_context(Settings(relay_tls_verify=True)).check_hostname
