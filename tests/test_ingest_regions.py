"""Region pinning at the SMTP front end: an ingest serves one region, and a recipient of a
customer pinned to another region is refused at RCPT (450 4.7.1 naming that region), so no
byte of that customer's mail and no event of it ever exists in this region. Real SMTP
conversations with a real front end on a real broker."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
import uuid
from pathlib import Path

import orjson
import pytest
import yaml
from prometheus_client import REGISTRY

from mailmeta import schema
from mailmeta.config import Settings, load_customers
from mailmeta.ingest import hash_password
from mailmeta.ingest._spool import Spool, decode_frames
from mailmeta.ingest.server import spool_dir
from mailmeta.kafka import ensure_topics
from mailmeta.local.process import free_port
from tests.kafka_helpers import files_containing, wait_until
from tests.smtp_helpers import Wire, message, read_events, read_raw, running_server

PASSWORD = "correct horse battery staple"
EU_RCPT = "anna@eu-customer.example"
EU_BOUNCE = "bounces@eu-bounces.example"
HOME_RCPT = "hugo@home.example"
# What a front end of another region answers for the EU customer's recipients.
TO_EU = (450, "4.7.1 Recipient is served in region 'eu' (mx.eu.example); not accepted here")
TO_DEFAULT = (450, "4.7.1 Recipient is served in region 'default'; not accepted here")
# Anything of the EU customer's that could show up in a record or a file.
EU_MARKS = (b"eucust", b"eu-customer.example", b"eu-bounces.example")


def _customers_file(tmp_path: Path) -> Path:
    path = tmp_path / "customers.yaml"
    data = {
        "regions": {"eu": {"api_url": "https://eu.api.example", "smtp_host": "mx.eu.example"}},
        "customers": [
            {
                "id": "home",
                "domains": ["home.example"],
                "retention_days": 30,
                "smtp_users": [{"username": "homeuser", "password_hash": hash_password(PASSWORD)}],
            },
            {
                "id": "eucust",
                "region": "eu",
                "domains": ["eu-customer.example"],
                "retention_days": 30,
                "bounce_addresses": [EU_BOUNCE],
                "client_networks": ["127.0.3.0/24"],
                "smtp_users": [{"username": "euuser", "password_hash": hash_password(PASSWORD)}],
            },
        ],
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _eu_settings(settings: Settings, config: Path) -> Settings:
    """An ingest of region eu on the test's broker: its topics are the region's own names."""
    eu = Settings(
        region="eu",
        config=config,
        data_dir=settings.data_dir.parent / "data-eu",
        kafka_bootstrap=settings.kafka_bootstrap,
        smtp_port=free_port(),
    )
    ensure_topics(eu, load_customers(config, "eu").shortest_retention_days)
    return eu


def _refused(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "mailmeta_ingest_recipients_rejected_total", {"reason": reason}
    )
    return value or 0.0


def _tls_client(port: int) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", port, timeout=15)
    c.ehlo("client.example.org")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the self-signed certificate of tls_self_signed
    c.starttls(context=ctx)
    c.ehlo("client.example.org")
    return c


def test_eu_ingest_takes_only_its_customers_mail(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    eu = _eu_settings(settings, _customers_file(tmp_path))
    assert eu.raw_topic == "mailmeta.raw.eu"
    token = uuid.uuid4().hex  # the topic is the region's: other tests' events may be on it
    before = _refused("other_region")
    with (
        caplog.at_level(logging.INFO, logger="mailmeta.ingest"),
        # The customers as every stage loads them; the server serves its settings' region.
        running_server(eu, load_customers(eu.config)) as srv,
    ):
        with Wire(srv.port) as w:
            assert w.cmd("EHLO client.example.org")[0] == 250
            assert w.cmd("MAIL FROM:<bob@example.org>")[0] == 250
            assert w.cmd(f"RCPT TO:<{HOME_RCPT}>") == TO_DEFAULT
            assert w.cmd(f"RCPT TO:<{EU_RCPT}>")[0] == 250
            assert w.cmd(f"RCPT TO:<{EU_BOUNCE}>")[0] == 250  # its bounce address too
            assert w.cmd("DATA")[0] == 354
            code, _ = w.send(message(f"mixed {token}") + b".\r\n")
            assert code == 250
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=15) as c:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
                c.sendmail("bob@example.org", [HOME_RCPT], message(f"home only {token}"))
            assert info.value.recipients == {HOME_RCPT: (TO_DEFAULT[0], TO_DEFAULT[1].encode())}

    events = [e for e in read_events(eu, min_count=1) if token in (e["subject"] or "")]
    assert [(e["customer_id"], e["rcpt_to"], e["subject"]) for e in events] == [
        ("eucust", [EU_RCPT, EU_BOUNCE], f"mixed {token}")
    ]
    assert _refused("other_region") - before == 2
    refusals = [r.getMessage() for r in caplog.records if "served in region" in r.getMessage()]
    assert len(refusals) == 2
    assert all("'home'" in m and "'default'" in m and "hugo" not in m for m in refusals)


def test_default_ingest_refuses_the_eu_customer_inbound_and_relayed(
    settings: Settings, tmp_path: Path
) -> None:
    config = _customers_file(tmp_path)
    s = settings.model_copy(
        update={"config": config, "tls_self_signed": True, "relay_networks": "127.0.4.0/24"}
    )
    with running_server(s, load_customers(config)) as srv:
        with Wire(srv.port) as w:
            assert w.cmd("EHLO client.example.org")[0] == 250
            assert w.cmd("MAIL FROM:<bob@example.org>")[0] == 250
            # Its domain, its bounce address, a VERP form of it: all before any DATA.
            for rcpt in (EU_RCPT, EU_BOUNCE, "bounces+orig-1=x.example@eu-bounces.example"):
                assert w.cmd(f"RCPT TO:<{rcpt}>") == TO_EU, rcpt
            assert w.cmd("DATA")[0] == 503  # no recipient accepted: no message at all
        # Relayed for it: from its client network, and (from the relay networks) as the
        # owner of the sender's domain.
        for source in ("127.0.3.1", "127.0.4.1"):
            with Wire(srv.port, source=source) as w:
                assert w.cmd("EHLO client.example.org")[0] == 250
                assert w.cmd(f"MAIL FROM:<{EU_RCPT}>")[0] == 250
                assert w.cmd("RCPT TO:<x@elsewhere.example>") == TO_EU, source
        # This region's own customer is served as ever: the topic read below sees its event.
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=15) as c:
            assert c.sendmail("bob@example.org", [HOME_RCPT], message("sentinel")) == {}

    records = read_raw(s, min_count=1)
    assert [orjson.loads(r)["subject"] for r in records] == ["sentinel"]
    assert not [m for m in EU_MARKS for r in records if m in r]
    assert not [m for m in EU_MARKS if files_containing(s.data_dir, m)]


def _login(port: int, user: str) -> tuple[int, bytes]:
    with _tls_client(port) as c:
        try:
            return c.login(user, PASSWORD)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code, exc.smtp_error


def test_a_front_end_knows_only_its_regions_smtp_users(settings: Settings, tmp_path: Path) -> None:
    """Another region's AUTH user fails like an unknown one (the same reply, after the same
    argon2 check against a dummy hash), so each region's failure limit guards all of its
    users: guesses cannot be spread over the regions."""
    config = _customers_file(tmp_path)
    home = settings.model_copy(update={"config": config, "tls_self_signed": True})
    eu = _eu_settings(settings, config).model_copy(update={"tls_self_signed": True})
    unknown = (535, b"5.7.8 Authentication credentials invalid")
    for s, own, other in ((home, "homeuser", "euuser"), (eu, "euuser", "homeuser")):
        with running_server(s, load_customers(config)) as srv:
            assert _login(srv.port, own)[0] == 235, s.region
            assert _login(srv.port, "nosuchuser") == unknown, s.region
            assert _login(srv.port, other) == unknown, s.region


def test_spooled_events_of_a_customer_moved_away_are_held_not_replayed(
    settings: Settings, tmp_path: Path
) -> None:
    """A spool written before the customers file pinned a customer to another region: its
    events stay on disk for that region and never reach this region's topic."""
    config = _customers_file(tmp_path)
    s = settings.model_copy(update={"config": config})
    records = []
    for customer_id in ("home", "eucust", "home"):
        ev = schema.Event(
            event_id=schema.new_event_id(),
            received_at=schema.now_ms(),
            customer_id=customer_id,
            status="accepted",
            subject=f"spooled for {customer_id}",
        )
        records.append((ev.event_id.encode(), schema.encode_event(ev)))

    async def spool_them() -> None:
        spool = Spool(spool_dir(s), s.ingest_spool_max_bytes)
        spool.open()
        await spool.store(records)
        await spool.aclose()

    asyncio.run(spool_them())
    with running_server(s, load_customers(config)) as srv:
        assert srv.spool is not None
        spool = srv.spool
        wait_until(lambda: spool.pending == 0, timeout=20, what="the spool replayed")

    on_topic = read_events(s, min_count=2)
    assert sorted(e["customer_id"] for e in on_topic) == ["home", "home"]
    held = spool_dir(s) / "held.eu.log"
    frames, end = decode_frames(held.read_bytes())
    assert end == held.stat().st_size
    assert [(k, v) for _, k, v in frames] == [records[1]]
    # A region's front end has its own spool: regions on one data dir never share one.
    assert spool_dir(s.model_copy(update={"region": "eu"})) == s.data_dir / "spool.eu" / "w0"
