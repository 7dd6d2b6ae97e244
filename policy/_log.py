"""Policies as a stream: records of the compacted policies topic, and reading/writing it.

One record per change, keyed by customer id (compaction keeps each customer's latest):

    {"customer_id": "demo", "version": 3, "policy": {<a customer's policy: block>},
     "actor": "local-operator", "at": "2026-…Z", "source": "api" | "config"}

Every redaction worker reads the whole topic into a faust GlobalTable (streams/app.py).
The sink's API writes it (``PolicyLog``): it seeds the topic from the config and publishes
operator changes. Keys never travel here: a record may name a key *id* only.

A version number names one document forever. The partition's order decides: the first record
of a customer's version N is version N; a later record of N or lower with another document
is a conflict every reader reports and none applies. A writer claims N (above every number in
the topic and the store's history), produces, reads back, and has published only when its
record is the one in force at its offset; otherwise it claims again (or answers 409 when the
caller expected another version). Kafka transactions would fence writers, but their commit
markers keep faust's GlobalTable recovery waiting forever (measured), so they are not used.

A record no reader can decode is an error (logged without its contents, counted, shown by
the API), never a deletion: only a tombstone (no value) removes a customer's record.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import KafkaException, Producer
from prometheus_client import Counter
from pydantic import ValidationError

from mailmeta.config import MAX_POLICY_BYTES, Customer, Customers, Policy, Settings
from mailmeta.kafka import producer_config, read_partition
from mailmeta.policy._redact import PolicyRecordError, compile_checked, named_field
from mailmeta.schema import now_ms

log = logging.getLogger("mailmeta.streams.policies")

# Policies are few and every worker reads all of them: one partition keeps them ordered.
POLICY_PARTITION = 0
# A record's bound: the document's (config.MAX_POLICY_BYTES) and room for the envelope.
MAX_RECORD_BYTES = MAX_POLICY_BYTES + 4096
# How often a writer claims a new number when other writers keep taking it first.
CLAIM_ATTEMPTS = 5

INVALID_RECORDS = Counter(
    "mailmeta_policy_invalid_records",
    "Records of the policies topic that could not be decoded (reported, never applied)",
    ["reader"],
)


class VersionTaken(RuntimeError):
    """The version the caller expected is no longer the one in force (another writer won)."""

    def __init__(self, in_force: int) -> None:
        super().__init__(f"version in force is {in_force}")
        self.in_force = in_force


def validation_problems(exc: ValidationError) -> list[dict[str, str]]:
    """Each error of a policy's validation as {field, problem}: the field a check over the
    whole mapping names in its message, else the error's location."""
    out = []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p not in ("actions", "rules")]
        msg = e.get("msg", "").removeprefix("Value error, ")
        field = ".".join(loc) or named_field(msg) or "policy"
        out.append({"field": field, "problem": msg})
    return out


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
    if len(value) > MAX_RECORD_BYTES:
        raise PolicyRecordError(
            f"field 'policy': the record is {len(value)} bytes, at most {MAX_RECORD_BYTES}"
        )
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
        problems = validation_problems(exc)
        raise PolicyRecordError(f"invalid policy: {problems[0]['problem']}", problems) from None
    return PolicyRecord(
        cid,
        version,
        policy,
        str(obj.get("actor", "")),
        str(obj.get("at", "")),
        str(obj.get("source", "")),
    )


def check_document(doc: Any, customer: Customer | None, version: int = 1) -> Policy:
    """The one validator: ``doc`` as a redaction worker would take it, or PolicyRecordError.

    The document travels the worker's path: in a record through ``decode_record``, then in
    its canonical form (what is published) through ``decode_record`` again, then compiled
    with the customer's keys. A document that does not survive its canonical form unchanged
    is refused, so what is published is what was validated.
    """
    cid = customer.id if customer is not None else "-"
    try:
        value = orjson.dumps({"customer_id": cid, "version": version, "policy": doc})
    except TypeError as exc:
        raise PolicyRecordError(f"field 'policy': not a JSON document: {exc}") from None
    rec = decode_record(cid.encode(), value)
    assert rec is not None
    again = decode_record(cid.encode(), rec.encode())
    if again is None or again.policy.digest() != rec.policy.digest():
        raise PolicyRecordError("field 'policy': changes when published in its canonical form")
    if customer is not None:
        compile_checked(customer, again.policy, version)
    return again.policy


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


@dataclass
class TopicState:
    """The policies topic as read to its end: per customer the record in force (the first
    record of each higher version), every record the readers refused, and the highest
    version any record claimed (so no writer reuses a number)."""

    records: dict[str, PolicyRecord] = field(default_factory=dict)
    highest: dict[str, int] = field(default_factory=dict)
    # customer id (or "?" when the key is unreadable) -> [{offset, problem}]
    problems: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Offsets of the records that were put in force when read.
    applied: set[int] = field(default_factory=set)


class TopicReader:
    """Applies records in the partition's order, as every reader must (the API's reads and
    the redaction worker's table): see the module's docstring."""

    def __init__(self, reader: str) -> None:
        self.state = TopicState()
        self.reader = reader
        # (customer, version) -> digest of the document that version names.
        self._named: dict[tuple[str, int], str] = {}

    def add(self, key: bytes | None, value: bytes | None, offset: int) -> PolicyRecord | None:
        """The record put in force by this one, or None (tombstone, refused, repeated)."""
        st = self.state
        name = (key or b"").decode("utf-8", "replace")
        try:
            rec = decode_record(key, value)
        except PolicyRecordError as exc:
            report_invalid(self.reader, name, offset, exc)
            st.problems.setdefault(name if name else "?", []).append(
                {"offset": offset, "problem": _bounded(str(exc))}
            )
            return None
        if rec is None:  # a tombstone: the only way a customer's record goes
            st.records.pop(name, None)
            return None
        cid = rec.customer_id
        st.highest[cid] = max(st.highest.get(cid, 0), rec.version)
        digest = rec.policy.digest()
        named = self._named.setdefault((cid, rec.version), digest)
        cur = st.records.get(cid)
        if named != digest or (cur is not None and rec.version < cur.version):
            if named != digest:
                problem = f"version {rec.version} published again with another document"
                st.problems.setdefault(cid, []).append({"offset": offset, "problem": problem})
                log.error("policy record at offset %s of %s: %s", offset, cid, problem)
            return None
        if cur is not None and rec.version == cur.version:
            return None
        st.records[cid] = rec
        st.applied.add(offset)
        return rec


_QUOTED = re.compile(r"'[^']*'")


def _bounded(text: str, limit: int = 300) -> str:
    # Escaped and bounded: a reason may quote a field name taken from the record.
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


def report_invalid(reader: str, customer: str, offset: int, exc: PolicyRecordError) -> None:
    """Counts and logs an undecodable record: its offset, key and the reason, never its
    contents. The policy in force stays in force."""
    INVALID_RECORDS.labels(reader).inc()
    # Quoted text in a reason comes from the record (a field name, a pattern): left out.
    reason = _QUOTED.sub("'…'", str(exc))
    log.error(
        "invalid policy record at offset %s (key %s), not applied: %s",
        offset, _bounded(customer, 80), _bounded(reason),
    )  # fmt: skip


class PolicyLog:
    """Reads the whole policies topic and publishes changes (used by the sink's API).

    Reading goes to the partition's high watermark, so a read after a publish sees it.
    ``lock`` serialises this process's writes; writers elsewhere are told apart by the
    claim (module docstring).
    """

    def __init__(self, settings: Settings, timeout: float = 10.0) -> None:
        self.settings = settings
        self.topic = settings.policies_topic
        self.timeout = timeout
        self.lock = threading.RLock()
        self._producer: Producer | None = None

    def read_all(self) -> dict[str, PolicyRecord]:
        return self.read().records

    def read(self) -> TopicState:
        reader = TopicReader("api")
        for msg in read_partition(
            self.settings,
            self.topic,
            POLICY_PARTITION,
            timeout=self.timeout,
            purpose="policy-reader",
        ):
            reader.add(msg.key(), msg.value(), msg.offset() or 0)
        return reader.state

    def _produce(self, records: Iterable[PolicyRecord]) -> list[int]:
        """Produces and waits for the broker; the records' offsets."""
        if self._producer is None:
            self._producer = Producer(producer_config(self.settings))
        errors: list[str] = []
        offsets: list[int] = []

        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                offsets.append(msg.offset())

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
        return offsets

    def publish(self, records: Iterable[PolicyRecord]) -> None:
        """Produces ``records`` as they are (no claim): for tests and tools that write the
        topic as a stray writer would."""
        self._produce(records)

    def claim(self, rec: PolicyRecord) -> bool:
        """Publishes ``rec`` and reads back: True when it is in force at its offset (its
        version was free), False when another record took the number first."""
        with self.lock:
            [offset] = self._produce([rec])
            won = offset in self.read().applied
        if not won:
            log.warning(
                "policy v%s of %s: another writer published that version first",
                rec.version, rec.customer_id,
            )  # fmt: skip
        return won

    def publish_next(
        self,
        customers: Customers,
        customer_id: str,
        make: Callable[[int], PolicyRecord],
        floor: int = 0,
        expected: int | None = None,
    ) -> tuple[PolicyRecord, PolicyRecord]:
        """Publishes ``make(N)`` as the customer's next version N: above every number the
        topic holds and ``floor`` (the store's history). Returns (old, new) in force.
        VersionTaken when the version in force is not ``expected``."""
        with self.lock:
            for _ in range(CLAIM_ATTEMPTS):
                state = self.read()
                old = effective(customers, state.records)[customer_id]
                if expected is not None and expected != old.version:
                    raise VersionTaken(old.version)
                n = max(old.version, state.highest.get(customer_id, 0), floor) + 1
                rec = make(n)
                if self.claim(rec):
                    return old, rec
        raise TimeoutError(f"no free policy version for {customer_id} in {CLAIM_ATTEMPTS} claims")

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
        published = []
        with self.lock:
            state = self.read()
            # Only this region's customers: the topic is the region's (policies.<region>),
            # and another region's policies are that region's to publish.
            for c in customers.here():
                have = state.records.get(c.id)
                config = PolicyRecord(
                    c.id, c.policy_version, c.policy, "config", now_ms(), "config"
                )
                kept = stored.get(c.id)
                best = max(
                    (r for r in (have, kept, config) if r is not None),
                    key=lambda r: r.version,
                )
                for other in (kept, config):
                    if (
                        have is not None
                        and other is not None
                        and other.version == have.version
                        and other.policy.digest() != have.policy.digest()
                    ):
                        log.error(
                            "customer %s: version %s in the topic is not the document the %s "
                            "holds for it; the topic's stays in force",
                            c.id, have.version,
                            "store's history" if other is kept else "customers file",
                        )  # fmt: skip
                if have is None or have.version < best.version:
                    if self.claim(best):
                        published.append(best)
                if best.version > c.policy_version:
                    log.warning(
                        "customer %s: the customers file has policy_version %s, but version %s "
                        "(%s by %s) is in force and stays in force",
                        c.id, c.policy_version, best.version, best.source, best.actor,
                    )  # fmt: skip
        for rec in published:
            log.info("published policy v%s of %s (%s)", rec.version, rec.customer_id, rec.source)
        return published
