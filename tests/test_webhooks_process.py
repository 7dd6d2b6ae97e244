"""The webhook stage as its own process (`python -m mailmeta.webhooks`, its own store): a
SIGKILL mid-batch loses nothing, and repeats nothing beyond the idempotency key (an event
sent twice is sent in the same batch under the same webhook-id)."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime

from mailmeta.config import Settings, load_customers
from mailmeta.schema import encode_event
from mailmeta.store import ClickHouseStore, WebhookEndpoint
from tests.event_helpers import Redacted
from tests.kafka_helpers import produce, run_stage, wait_until
from tests.webhook_helpers import Receiver


def test_sigkill_mid_batch_loses_nothing_and_doubles_nothing_beyond_the_webhook_id(
    settings: Settings,
) -> None:
    settings = settings.model_copy(
        update={
            "webhook_allow_networks": "127.0.0.1/32",
            "webhook_batch_max": 5,
            "webhook_retry_base_s": 0.2,
            "webhook_retry_max_s": 1.0,
        }
    )
    customers = load_customers(settings.config)
    customer = next(iter(customers)).id
    receiver = Receiver()
    try:
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        receiver.secrets["/kill"] = secret
        receiver.modes["/kill"] = "slow"
        store = ClickHouseStore(settings.resolved_dsn(), {customer: 30})
        store.save_webhook_endpoint(
            WebhookEndpoint(
                "wh_kill",
                customer,
                receiver.url("/kill"),
                frozenset(),
                True,
                secret,
                datetime.now(UTC),
            )
        )
        store.close()
        redact = Redacted(customers)
        events = [redact(customer) for _ in range(40)]
        ids = {e.event_id for e in events}

        with run_stage("mailmeta.webhooks", settings, "mailmeta webhooks: running") as stage:
            produce(
                settings.kafka_bootstrap, settings.redacted_topic, [encode_event(e) for e in events]
            )
            # Mid-batch: two batches delivered and the receiver holding the next one (it
            # answers after 0.3 s) when the stage dies.
            wait_until(
                lambda: (
                    len(receiver.deliveries("/kill")) >= 2
                    and len([p for p, _ in receiver.hits]) > len(receiver.deliveries("/kill"))
                ),
                60,
                "a batch in flight after two delivered",
                interval=0.02,
            )
            stage.proc.kill()
            stage.proc.wait(10)
        got_before = {e["event_id"] for e in receiver.events("/kill")}
        assert got_before < ids, "killed too late to prove anything"

        with run_stage("mailmeta.webhooks", settings, "mailmeta webhooks: running"):
            wait_until(
                lambda: {e["event_id"] for e in receiver.events("/kill")} == ids,
                60,
                "every event after the restart",
            )
        assert receiver.bad == []
        # Whatever was sent twice was the same batch under the same webhook-id.
        ids_of: dict[str, set[str]] = {}
        for r in receiver.deliveries("/kill"):
            for e in r.events:
                ids_of.setdefault(e["event_id"], set()).add(r.webhook_id)
        assert all(len(w) == 1 for w in ids_of.values()), ids_of
        repeats = len(receiver.events("/kill")) - len(ids)
        print(f"events repeated after the SIGKILL: {repeats} (same webhook-id)")
        # The batch in flight at the kill was answered but never settled: sent again, whole.
        assert repeats >= 1
    finally:
        receiver.close()
