"""Policies as a stream: records of the compacted policies topic, and reading/writing it.

One record per change, keyed by customer id (compaction keeps each customer's latest):

    {"customer_id": "demo", "version": 3, "policy": {<a customer's policy: block>},
     "actor": "local-operator", "at": "2026-…Z", "source": "api" | "config"}

Every redaction worker reads the whole topic into a faust GlobalTable (streams/app.py).
The sink's API is the one writer (``PolicyLog``): it seeds the topic from the config and
publishes operator changes. Keys never travel here: a record may name a key *id* only.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from pydantic import ValidationError

from mailmeta.config import Customers, Policy, Settings
from mailmeta.kafka import consumer_config, producer_config
from mailmeta.schema import now_ms

log = logging.getLogger("mailmeta.streams.policies")

# Policies are few and every worker reads all of them: one partition keeps them ordered.
POLICY_PARTITION = 0


class PolicyRecordError(ValueError):
    """A record on the policies topic that is not a valid policy record."""


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    customer_id: str
    version: int
    policy: Policy
    actor: str = "config"
    at: str = ""
    source: str = "config"

    def to_json(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "version": self.version,
            "policy": self.policy.document(),
            "actor": self.actor,
            "at": self.at,
            "source": self.source,
        }

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())


def decode_record(key: bytes | None, value: bytes | None) -> PolicyRecord | None:
    """The record, or None for a tombstone; raises PolicyRecordError when malformed."""
    if value is None:
        return None
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise PolicyRecordError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise PolicyRecordError("not a JSON object")
    cid, version = obj.get("customer_id"), obj.get("version")
    if not isinstance(cid, str) or (key is not None and key != cid.encode()):
        raise PolicyRecordError("customer_id missing or not the record's key")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PolicyRecordError("version must be a positive integer")
    try:
        policy = Policy.model_validate(obj.get("policy") or {})
    except ValidationError as exc:
        raise PolicyRecordError(f"invalid policy: {exc.errors()[0]['msg']}") from None
    return PolicyRecord(
        cid,
        version,
        policy,
        str(obj.get("actor", "")),
        str(obj.get("at", "")),
        str(obj.get("source", "")),
    )


def config_record(customers: Customers, customer_id: str) -> PolicyRecord:
    c = customers.by_id[customer_id]
    return PolicyRecord(c.id, c.policy_version, c.policy, "config", "", "config")


def effective(customers: Customers, topic: dict[str, PolicyRecord]) -> dict[str, PolicyRecord]:
    """The policy in force per customer: the newer of the topic's and the config's."""
    out = {}
    for c in customers:
        rec = topic.get(c.id)
        out[c.id] = (
            rec
            if rec is not None and rec.version >= c.policy_version
            else (config_record(customers, c.id))
        )
    return out


class PolicyLog:
    """Reads the whole policies topic and publishes changes (used by the sink's API).

    Reading goes to the partition's high watermark, so a read after a publish sees it.
    ``lock`` serialises read-modify-publish, so versions of one API never collide.
    """

    def __init__(self, settings: Settings, timeout: float = 10.0) -> None:
        self.settings = settings
        self.topic = settings.policies_topic
        self.timeout = timeout
        self.lock = threading.Lock()
        self._producer: Producer | None = None

    def read_all(self) -> dict[str, PolicyRecord]:
        # A throwaway group: it only reads (assign, no commit), so it is never joined.
        consumer = Consumer(
            consumer_config(
                self.settings,
                f"mailmeta-policy-reader-{uuid.uuid4().hex}",
                **{"enable.partition.eof": True},
            )
        )
        out: dict[str, PolicyRecord] = {}
        try:
            tp = TopicPartition(self.topic, POLICY_PARTITION)
            _low, high = consumer.get_watermark_offsets(tp, timeout=self.timeout, cached=False)
            if high <= 0:
                return out
            consumer.assign([TopicPartition(self.topic, POLICY_PARTITION, 0)])
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                err = msg.error()
                offset = msg.offset() or 0
                if err is not None:
                    if err.code() == -191:  # _PARTITION_EOF
                        if offset >= high:
                            return out
                        continue
                    raise KafkaException(err)
                try:
                    rec = decode_record(msg.key(), msg.value())
                except PolicyRecordError as exc:
                    log.warning("ignoring policy record at offset %s: %s", offset, exc)
                    rec = None
                key = (msg.key() or b"").decode("utf-8", "replace")
                if rec is None:
                    out.pop(key, None)
                else:
                    out[rec.customer_id] = rec
                if offset + 1 >= high:
                    return out
            raise TimeoutError(f"policies topic {self.topic} not read within {self.timeout}s")
        finally:
            consumer.close()

    def publish(self, records: Iterable[PolicyRecord]) -> None:
        if self._producer is None:
            self._producer = Producer(producer_config(self.settings))
        errors: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        n = 0
        for rec in records:
            self._producer.produce(
                self.topic,
                rec.encode(),
                key=rec.customer_id.encode(),
                partition=POLICY_PARTITION,
                on_delivery=on_delivery,
            )
            n += 1
        if n and self._producer.flush(self.timeout) != 0:
            raise TimeoutError("the broker did not acknowledge the policy change in time")
        if errors:
            raise KafkaException(errors[0])

    def close(self) -> None:
        """Stop the producer's threads (bounded): they would outlive the app otherwise."""
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(self.timeout)
            producer.close()

    def seed(
        self, customers: Customers, stored: Mapping[str, PolicyRecord] | None = None
    ) -> list[PolicyRecord]:
        """Make the topic hold, per customer of the region, the newest policy recorded anywhere
        durable.

        Candidates: the topic's record, ``stored`` (the store's policy history, which outlives
        a broker that lost its topic) and the customers file. The newest version wins; a file
        whose ``policy_version`` is older than the one in force is reported, never applied, so
        a restart cannot undo a redaction an operator ordered. Returns what was published.
        """
        stored = stored or {}
        with self.lock:
            topic = self.read_all()
            due = []
            # Only this region's customers: the topic is the region's (policies.<region>),
            # and another region's policies are that region's to publish.
            for c in customers.here():
                have = topic.get(c.id)
                config = PolicyRecord(
                    c.id, c.policy_version, c.policy, "config", now_ms(), "config"
                )
                best = max(
                    (r for r in (have, stored.get(c.id), config) if r is not None),
                    key=lambda r: r.version,
                )
                if have is None or have.version < best.version:
                    due.append(best)
                if best.version > c.policy_version:
                    log.warning(
                        "customer %s: the customers file has policy_version %s, but version %s "
                        "(%s by %s) is in force and stays in force",
                        c.id, c.policy_version, best.version, best.source, best.actor,
                    )  # fmt: skip
            self.publish(due)
        for rec in due:
            log.info("published policy v%s of %s (%s)", rec.version, rec.customer_id, rec.source)
        return due
