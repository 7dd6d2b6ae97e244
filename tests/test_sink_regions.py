"""Region pinning in the sink (issue 17.4): a sink of region eu stores the events of eu
customers only; a (properly redacted) event of another region's customer that reaches its
topic is dead-lettered, with the reason and none of its metadata, and never stored."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from mailmeta.config import Settings, load_customers
from mailmeta.policy import Redactor
from mailmeta.schema import encode_event
from mailmeta.service import SinkService
from tests.kafka_helpers import produce, read_to_end, wait_until
from tests.test_streams_regions import (
    HOME_SECRETS,
    acme_event,
    customers_file,
    eu_settings,
    home_event,
    record_bytes,
)

pytestmark = pytest.mark.slow


def test_eu_sink_stores_eu_events_and_dead_letters_the_default_regions(
    settings: Settings, tmp_path: Path
) -> None:
    config = customers_file(tmp_path)
    s = eu_settings(settings, config)
    eu = load_customers(config, "eu")
    # What each region's worker writes: the default region's redactor made home's record
    # (as if a misrouted default worker had produced to the eu topic), eu's made acme's.
    home_redacted = Redactor(load_customers(config)).redact(home_event())
    acme_redacted = Redactor(eu).redact(acme_event())
    later_home = Redactor(load_customers(config)).redact(home_event())

    service = SinkService(s, eu).start()
    try:
        store, consumer = service.store, service.consumer
        assert store is not None and consumer is not None
        # One batch with both (the columnwise path must not take it), then home's alone.
        produce(
            s.kafka_bootstrap,
            s.redacted_topic,
            [encode_event(home_redacted), encode_event(acme_redacted)],
            partition=0,
        )
        stored = wait_until(
            lambda: store.query_messages("acme"), timeout=30, what="acme's event stored"
        )
        wait_until(lambda: consumer.stats.dead_lettered >= 1, timeout=30, what="a dead letter")
        produce(s.kafka_bootstrap, s.redacted_topic, [encode_event(later_home)], partition=0)
        wait_until(lambda: consumer.stats.dead_lettered >= 2, timeout=30, what="2 dead letters")
        dead = read_to_end(s.kafka_bootstrap, s.deadletter_topic)  # every one: none extra

        assert [m["event_id"] for m in stored] == [acme_redacted.event_id]
        assert store.query_messages("home") == []
        assert store.count("home") == 0 and store.count() == 1
        assert consumer.stats.rows_inserted == 1
    finally:
        assert service.stop(), "sink did not stop cleanly in time"

    reason = "customer 'home' is served in region 'default', not in 'eu'"
    assert len(dead) == 2
    dead.sort(key=lambda m: orjson.loads(m.value())["offset"])  # spread over its partitions
    for letter, (ev, offset) in zip(dead, [(home_redacted, 0), (later_home, 2)], strict=True):
        headers = dict(letter.headers() or [])
        assert headers["mailmeta-error"].decode() == reason
        assert headers["mailmeta-source"].decode() == f"{s.redacted_topic}/0@{offset}"
        assert orjson.loads(letter.value()) == {
            "reason": reason,
            "event_id": ev.event_id,
            "customer_id": "home",
            "topic": s.redacted_topic,
            "partition": 0,
            "offset": offset,
        }
    # The dead letters carry nothing of home's metadata, redacted or not.
    for m in read_to_end(s.kafka_bootstrap, s.deadletter_topic):
        for secret in (*HOME_SECRETS, b"c***", b"d***"):
            assert secret not in record_bytes(m), secret
