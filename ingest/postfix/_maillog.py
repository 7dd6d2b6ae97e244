"""Postfix's mail log -> status events of the messages it names.

Lines are joined on the queue id: ``client=`` (smtpd) gives the client address,
``message-id=`` (cleanup) the message, ``from=<…>, size=`` (qmgr) the sender and size, and each
``to=<…>, relay=…, dsn=…, status=…`` (smtp, lmtp, local, error…) one event for its recipient:
``sent`` -> delivered, ``deferred`` (with the attempt number), ``bounced``, ``expired``.
``NOQUEUE: reject`` lines become ``rejected`` events. A ``sent`` whose reply says ``queued as
X`` for a queue id of this same log is a hop through a content filter: no event, and X carries
the message on. ``removed`` ends a queue id, so a reused one starts afresh.

Lines hold clear addresses: they only ever become raw events (redacted downstream); no line
is logged.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from mailmeta import schema
from mailmeta.config import Customers

# How many queue ids are remembered at once (a log that never says "removed" must not grow
# the table, nor the position file, without bound): the oldest are forgotten first.
MAX_QUEUED = 50_000
MAX_REPLY = 500

_LINE = re.compile(r"\bpostfix(?:-[\w.-]+)?/(?P<daemon>[\w/.-]+)\[\d+\]: (?P<text>.*)$")
_QUEUED = re.compile(r"(?P<qid>[0-9A-Za-z]{5,20}): (?P<rest>.*)$")
_CLIENT = re.compile(r"client=[^\[,]*\[(?P<ip>[^\]]*)\]")
_MESSAGE_ID = re.compile(r"message-id=(?P<mid>\S*)")
_FROM = re.compile(r"from=<(?P<sender>[^>]*)>, size=(?P<size>\d+), nrcpt=")
_EXPIRED = re.compile(r"from=<[^>]*>, status=expired")
_TO = re.compile(
    r"to=<(?P<to>[^>]*)>, (?:orig_to=<[^>]*>, )?relay=(?P<relay>[^,]*), .*?"
    r"dsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3}), status=(?P<status>\w+)(?: \((?P<text>.*)\))?$"
)
_REJECT = re.compile(
    r"NOQUEUE: (?:reject|milter-reject): \w+ from [^\[]*\[(?P<ip>[^\]]*)\]: "
    r"(?P<reply>[2-5]\d\d .*?); from=<(?P<sender>[^>]*)> to=<(?P<to>[^>]*)>"
    r"(?: proto=\S+)?(?: helo=<(?P<helo>[^>]*)>)?"
)
_QUEUED_AS = re.compile(r"queued as (?P<qid>[0-9A-Za-z]{5,20})\b")
_TICK = timedelta(milliseconds=1)
_STATUS = {"sent": "delivered", "deferred": "deferred", "bounced": "bounced", "expired": "expired"}


@dataclass
class Queued:
    """What the log said so far about one queue id."""

    sender_ip: str | None = None
    message_id: str | None = None
    mail_from: str | None = None
    size: int | None = None
    attempts: dict[str, int] = field(default_factory=dict)  # recipient -> deferrals so far


def _clip(text: str | None, limit: int) -> str | None:
    return text[:limit] if text else None


class LogParser:
    """Turns log lines into events; its state (the queue ids in flight) can be saved and
    restored with the follower's position."""

    def __init__(self, customers: Customers) -> None:
        self.customers = customers
        self.queue: dict[str, Queued] = {}
        self._last = datetime.min.replace(tzinfo=UTC)

    # -- state -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {qid: asdict(q) for qid, q in self.queue.items()}

    def load(self, state: dict[str, Any]) -> None:
        self.queue = {qid: Queued(**q) for qid, q in state.items()}

    def _entry(self, qid: str, *, fresh: bool = False) -> Queued:
        q = self.queue.get(qid)
        if q is None or fresh:
            if len(self.queue) >= MAX_QUEUED:
                del self.queue[next(iter(self.queue))]
            q = self.queue[qid] = Queued()
        return q

    # -- lines -----------------------------------------------------------------------------

    def feed(self, line: str) -> list[schema.Event]:
        m = _LINE.search(line)
        if m is None:
            return []
        text = m.group("text")
        if text.startswith("NOQUEUE:"):
            return self._rejected(text)
        qm = _QUEUED.match(text)
        if qm is None:
            return []
        qid, rest = qm.group("qid"), qm.group("rest")
        if rest.startswith("client="):
            cm = _CLIENT.match(rest)
            # smtpd starts the queue file: a reused id begins afresh here.
            self._entry(qid, fresh=True).sender_ip = cm.group("ip") if cm else None
        elif rest.startswith("message-id="):
            mm = _MESSAGE_ID.match(rest)
            self._entry(qid).message_id = _clip(mm.group("mid") if mm else None, 998)
        elif rest.startswith("from="):
            if _EXPIRED.match(rest):
                return self._expired(qid)
            fm = _FROM.match(rest)
            if fm is not None:
                q = self._entry(qid)
                q.mail_from = fm.group("sender")
                q.size = int(fm.group("size"))
        elif rest.startswith("to="):
            tm = _TO.match(rest)
            if tm is not None:
                return self._status(qid, tm)
        elif rest == "removed":
            self.queue.pop(qid, None)
        return []

    def _event(
        self, customer_id: str, status: str, q: Queued | None, **fields: Any
    ) -> schema.Event:
        base: dict[str, Any] = {}
        if q is not None:
            base = {
                "sender_ip": q.sender_ip,
                "mail_from": q.mail_from,
                "message_id": q.message_id,
                "size_bytes": q.size,
            }
        base.update(fields)
        # Strictly increasing times: one message's statuses (often logged within one
        # millisecond) keep the log's order wherever they are read, on any partition.
        now = datetime.now(UTC)
        self._last = max(now, self._last + _TICK)
        return schema.Event(
            event_id=schema.new_event_id(),
            received_at=schema.format_time(self._last),
            customer_id=customer_id,
            status=status,
            **base,
        )

    def _customer(self, rcpt: str) -> str | None:
        customer = self.customers.for_address(rcpt)
        if customer is None or self.customers.served_elsewhere(customer.id) is not None:
            return None
        return customer.id

    def _status(self, qid: str, tm: re.Match[str]) -> list[schema.Event]:
        status = _STATUS.get(tm.group("status"))
        if status is None:
            return []
        rcpt, text = tm.group("to"), tm.group("text") or ""
        q = self._entry(qid)
        if status == "delivered":
            hop = _QUEUED_AS.search(text)
            nxt = self.queue.get(hop.group("qid")) if hop else None
            if nxt is not None and hop is not None and hop.group("qid") != qid:
                # Through a content filter and back into this Postfix: the message goes on
                # under the new queue id, from the original client.
                nxt.sender_ip = q.sender_ip or nxt.sender_ip
                nxt.message_id = nxt.message_id or q.message_id
                return []
        attempt = q.attempts.get(rcpt, 0) + 1
        if status == "deferred":
            q.attempts[rcpt] = attempt
        customer_id = self._customer(rcpt)
        if customer_id is None:
            return []
        reply = f"{tm.group('dsn')} (attempt {attempt}, relay {tm.group('relay')}) {text}"
        return [
            self._event(customer_id, status, q, rcpt_to=[rcpt], smtp_reply=_clip(reply, MAX_REPLY))
        ]

    def _expired(self, qid: str) -> list[schema.Event]:
        """Queue lifetime over: every recipient still deferred is returned."""
        q = self.queue.get(qid)
        if q is None:
            return []
        out = []
        for rcpt, attempts in q.attempts.items():
            customer_id = self._customer(rcpt)
            if customer_id is not None:
                reply = f"expired after {attempts} attempt(s)"
                out.append(self._event(customer_id, "expired", q, rcpt_to=[rcpt], smtp_reply=reply))
        return out

    def _rejected(self, text: str) -> list[schema.Event]:
        rm = _REJECT.match(text)
        if rm is None:
            return []
        customer_id = self._customer(rm.group("to"))
        if customer_id is None:
            return []
        return [
            self._event(
                customer_id,
                "rejected",
                None,
                sender_ip=rm.group("ip"),
                helo=_clip(rm.group("helo"), 255),
                mail_from=rm.group("sender"),
                rcpt_to=[rm.group("to")],
                smtp_reply=_clip(rm.group("reply"), MAX_REPLY),
            )
        ]
