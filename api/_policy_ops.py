"""What the policy routes do besides HTTP: parse a document into a policy (or the fields and
reasons it fails on), preview a policy on stored rows, rewrite stored rows, and keep each
version's document and audit record in the store."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from mailmeta.config import Customer, Customers, Policy
from mailmeta.policy import (
    PolicyRecord,
    PolicyRecordError,
    check_document,
    diff,
    plan,
    rewriter,
)
from mailmeta.store import Store


class PolicyInvalid(ValueError):
    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__("invalid policy")
        self.problems = problems


async def on_invalid(_request: Request, exc: Exception) -> JSONResponse:
    problems = exc.problems if isinstance(exc, PolicyInvalid) else []
    # Names the field and the reason; the policy in force is untouched.
    return JSONResponse({"error": "invalid policy", "problems": problems}, status_code=422)


def parse_policy(doc: dict[str, Any], customer: Customer | None) -> Policy:
    """The policy, or a 422 naming each field and reason: the redaction worker's own check
    (``check_document``), so the API refuses exactly what a worker would."""
    try:
        return check_document(doc, customer)
    except PolicyRecordError as exc:
        raise PolicyInvalid(exc.problems) from None


def newest_stored(store: Store, customers: Customers) -> dict[str, PolicyRecord]:
    """Each customer's newest policy version in the store's history (durable in ClickHouse)."""
    out = {}
    for c in customers:
        versions = store.policy_versions(c.id)
        if versions:
            v = max(versions)
            h = versions[v]
            policy = Policy.model_validate(h["policy"])
            out[c.id] = PolicyRecord(c.id, v, policy, str(h["actor"]), str(h["at"]), "restored")
    return out


def remember(store: Store, rec: PolicyRecord, action: str, old: PolicyRecord | None) -> None:
    """The version's document in ``policy_versions`` and its audit record (with the diff)."""
    store.record_policy_version(
        rec.customer_id, rec.version, rec.policy.document(), rec.actor, rec.source
    )
    store.append_audit(
        rec.actor,
        action,
        rec.customer_id,
        {
            "old_version": old.version if old else None,
            "new_version": rec.version,
            "diff": diff(old.policy if old else None, rec.policy),
        },
    )


def stored_policies(
    store: Store, customers: Customers, customer: str, current: PolicyRecord | None
) -> dict[int, Policy]:
    """Policy per version as recorded (plus the config's and the one in force)."""
    out: dict[int, Policy] = {}
    for v, h in store.policy_versions(customer).items():
        try:
            out[v] = Policy.model_validate(h["policy"])
        except ValidationError:
            continue
    c = customers.by_id[customer]
    out.setdefault(c.policy_version, c.policy)
    if current is not None:
        out.setdefault(current.version, current.policy)
    return out


def preview_row(
    c: Customer, row: dict[str, Any], old: Policy | None, proposed: Policy
) -> dict[str, Any]:
    """One stored row next to what ``proposed`` would make of it, field by field."""
    transitions = plan(old, proposed)
    after = rewriter(c, proposed, transitions)(row) or row
    return {
        "event_id": row["event_id"],
        "received_at": row["received_at"],
        "stored_version": row["policy_version"],
        "fields": {
            name: {
                "before": row.get(name),
                "after": after.get(name),
                "change": t.kind,
                "why": t.reason,
            }
            for name, t in transitions.items()
            if t.kind != "unchanged" or row.get(name) is not None
        },
    }


def apply_to_stored(
    store: Store, customers: Customers, c: Customer, rec: PolicyRecord, actor: str
) -> dict[str, Any]:
    """Rewrites stored rows older than ``rec`` to its policy; audited."""
    versions = stored_policies(store, customers, c.id, None)
    stored = store.stored_versions(c.id)
    # Rows of each stored version get the transitions from that version's policy.
    rewritten = 0
    per_version = {}
    for v in sorted(stored):
        if v >= rec.version:
            continue
        transitions = plan(versions.get(v), rec.policy)
        changing = {n: t.kind for n, t in transitions.items() if t.kind != "unchanged"}
        if not changing:
            continue
        n = store.rewrite_stored(c.id, [v], rec.version, rewriter(c, rec.policy, transitions))
        rewritten += n
        per_version[str(v)] = {"rows": n, "fields": changing}
    details = {"version": rec.version, "rows_rewritten": rewritten, "by_version": per_version}
    store.append_audit(actor, "policy.apply_to_stored", c.id, details)
    return details
