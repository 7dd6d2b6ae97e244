"""Erased events stay erased when a sink group re-reads the redacted topic (issue 14.11).

Real Tansu broker, real sink (SinkService) on embedded ClickHouse, events redacted by the
real redactor.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest

from mailmeta.config import Customer, Customers, Settings
from mailmeta.local.apache_kafka import KafkaNode
from mailmeta.local.brokers import LocalBroker
from mailmeta.schema import Event, encode_event, format_time
from mailmeta.service import SinkService
from mailmeta.store import ClickHouseStore
from tests.event_helpers import Redacted
from tests.kafka_helpers import produce, sink_settings
from tests.test_sink import wait_for

KEY = "erasure-test-key-0123456789"
POLICY = {"mail_from": "hmac", "rcpt_to": "keep", "message_id": "keep", "subject": "keep"}
CUSTOMERS = Customers(
    [
        Customer.model_validate(
            {
                "id": cid,
                "domains": [f"{cid}.example"],
                "retention_days": 60,
                "hmac_key": KEY,
                "policy": POLICY,
            }
        )
        for cid in ("erase", "wipe")
    ]
)
rows = Redacted(CUSTOMERS)


def mail(customer: str, mail_from: str, rcpt: str = "bob@erase.example", **fields: Any) -> Event:
    fields.setdefault("received_at", format_time(datetime.now(UTC) - timedelta(minutes=5)))
    return rows(customer, mail_from=mail_from, rcpt_to=[rcpt], **fields)


@pytest.fixture
def settings(broker: LocalBroker | KafkaNode, tmp_path: Path) -> Settings:
    return sink_settings(broker.bootstrap, tmp_path, CUSTOMERS, "erase", partitions=1)


def ids(store: ClickHouseStore, customer: str) -> set[str]:
    return {m["event_id"] for m in store.query_messages(customer, limit=1000)}


def test_erased_events_do_not_come_back_when_a_new_group_rereads_the_topic(
    settings: Settings,
) -> None:
    alice = [mail("erase", "alice@sender.example") for _ in range(3)]
    to_alice = mail("erase", "carol@sender.example", rcpt="alice@sender.example")
    by_mid = mail("erase", "dave@sender.example", message_id="<erase-me@mx.example>")
    frank = mail("erase", "frank@sender.example")  # held only as a hash
    kept = [mail("erase", "bob@sender.example") for _ in range(4)]
    wiped = [mail("wipe", "eve@sender.example") for _ in range(3)]
    first = [*alice, to_alice, by_mid, frank, *kept, *wiped]
    produce(settings.kafka_bootstrap, settings.redacted_topic, [encode_event(e) for e in first])

    with SinkService(settings, CUSTOMERS, group_id=f"a-{uuid.uuid4().hex}") as sink:
        store = sink.store
        assert store is not None
        wait_for(lambda: len(ids(store, "erase")) == 10 and len(ids(store, "wipe")) == 3)
        # What the API's erase passes: every stored form of the clear values.
        addr = store.erase("erase", addresses=rows.forms("erase", "alice@sender.example"))
        assert addr.rows == 4
        mid = store.erase("erase", message_ids=rows.forms("erase", "<erase-me@mx.example>"))
        assert mid.rows == 1
        assert store.erase("erase", addresses=rows.forms("erase", "frank@sender.example")).rows
        assert store.erase("wipe", everything=True).rows == 3
        assert ids(store, "erase") == {e.event_id for e in kept}

    # The log holds what the rows held (the hash of a hashed field), never more.
    client = clickhouse_connect.get_client(dsn=f"chdb://{settings.data_dir / 'clickhouse'}")
    try:
        logged = client.query(
            "SELECT customer_id, scope, forms FROM erasure_log ORDER BY customer_id, at, scope"
        ).result_rows
    finally:
        client.close()
    [(_, _, alice_forms), (_, _, mid_forms), (_, _, frank_forms), wipe_entry] = logged
    hashes = set(rows.forms("erase", "frank@sender.example")) - {"frank@sender.example"}
    assert frank.mail_from in frank_forms and set(frank_forms) == hashes  # no clear form
    # alice's clear form was held (as a recipient: the policy keeps rcpt_to).
    assert alice[0].mail_from in alice_forms and "alice@sender.example" in alice_forms
    assert "<erase-me@mx.example>" in mid_forms
    assert wipe_entry == ("wipe", "all", [])

    # Mail after the erasure is new mail: it is stored.
    now = format_time(datetime.now(UTC) + timedelta(seconds=1))
    later = mail("wipe", "eve@sender.example", received_at=now)
    again = mail("erase", "alice@sender.example", received_at=now)
    produce(
        settings.kafka_bootstrap,
        settings.redacted_topic,
        [encode_event(later), encode_event(again)],
    )

    # A new group starts at offset 0: every record is delivered again.
    with SinkService(settings, CUSTOMERS, group_id=f"b-{uuid.uuid4().hex}") as replay:
        store = replay.store
        assert store is not None
        wait_for(lambda: later.event_id in ids(store, "wipe"), what="the replay to reach the end")
        assert ids(store, "erase") == {e.event_id for e in kept} | {again.event_id}
        assert ids(store, "wipe") == {later.event_id}
