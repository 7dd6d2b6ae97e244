"""Policy diffs, and what a new policy does to rows stored under an older one.

Stored rows are already redacted: a field can only move to a form derivable from what is
stored. Per field, from the stored version's rule to the new one:

- the same rule: unchanged;
- new ``drop``: dropped (always derivable);
- old ``keep`` (no replacements): the new action applied to the stored, original value;
- ``truncate_ip`` to a shorter prefix: the stored network narrowed;
- otherwise, when the new rule is stricter (a higher rank below) but cannot be derived
  from the stored form (e.g. masked -> hashed): dropped, so no weaker form stays;
- otherwise (looser or as strict): unchanged. Loosening never un-redacts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailmeta.config import POLICY_FIELDS, Action, Customer, FieldRule, Policy
from mailmeta.policy._redact import scalar_for

PREVIEW_NOTE = (
    "before = the stored (already redacted) value; after = that row once the policy is set "
    "with --apply-to-stored. Unredacted originals are not kept, so a stored field can only "
    "become stricter: looser rules apply to new events only. Rows from the last few seconds "
    "may still be in flight under the old version."
)

_RANK = {
    Action.keep: 0,
    Action.truncate_ip: 2,
    Action.domain_only: 2,
    Action.mask: 2,
    Action.length_only: 3,
    Action.hmac: 3,
    Action.drop: 4,
}


@dataclass(frozen=True, slots=True)
class Transition:
    kind: str  # unchanged | apply | drop
    reason: str


def _rank(rule: FieldRule) -> int:
    return 1 if rule.action is Action.keep and rule.replace else _RANK[rule.action]


def transition(old: FieldRule | None, new: FieldRule) -> Transition:
    if old is not None and old == new:
        return Transition("unchanged", "same rule")
    if new.action is Action.drop:
        if old is not None and old.action is Action.drop:
            return Transition("unchanged", "already dropped")
        return Transition("drop", "new rule drops the field")
    if old is None:
        return Transition("unchanged", "stored version's policy unknown; only drop applies")
    if old.action is Action.keep and not old.replace:
        return Transition("apply", f"stored value is the original: {new.action.value} applies")
    if old.action is Action.truncate_ip and new.action is Action.truncate_ip:
        v4o, v4n = old.ipv4_prefix or 24, new.ipv4_prefix or 24
        v6o, v6n = old.ipv6_prefix or 48, new.ipv6_prefix or 48
        if v4n <= v4o and v6n <= v6o:
            return Transition("apply", "shorter prefix: the stored network is narrowed")
        return Transition("unchanged", "longer prefix is looser: stored value kept")
    if old.action is Action.keep and new.action is Action.keep and new.replace:
        return Transition("apply", "new replacements applied to the stored subject")
    if _rank(new) > _rank(old):
        return Transition(
            "drop", f"{new.action.value} cannot be derived from the stored {old.action.value} form"
        )
    return Transition("unchanged", "not stricter: stored value kept (never un-redacted)")


def plan(old: Policy | None, new: Policy) -> dict[str, Transition]:
    return {
        name: transition(old.rule_for(name) if old is not None else None, new.rule_for(name))
        for name in POLICY_FIELDS
    }


def rewriter(
    customer: Customer, new: Policy, transitions: dict[str, Transition]
) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    """A stored row (schema dict) -> the row rewritten, or None when nothing changes."""
    active = new.hmac_key_id or customer.active_key_id
    keys = customer.keys() if new.uses_hmac else {}
    fns: dict[str, Callable[[str], str | None] | None] = {}
    for name, t in transitions.items():
        if t.kind == "apply":
            fn = scalar_for(new.rule_for(name), active, keys.get(active or ""))
            if fn is not None:  # None: keep as stored
                fns[name] = fn
        elif t.kind == "drop":
            fns[name] = None

    def rewrite(row: dict[str, Any]) -> dict[str, Any] | None:
        out = dict(row)
        for name, fn in fns.items():
            value = row.get(name)
            if value is None:
                continue
            if fn is None:
                out[name] = None
            elif isinstance(value, list):
                out[name] = [r for r in map(fn, value) if r is not None] or None
            elif isinstance(value, str):
                out[name] = fn(value)
            else:
                out[name] = None  # numbers only keep or drop
        return out if out != row else None

    return rewrite


def diff(old: Policy | None, new: Policy) -> dict[str, dict[str, Any]]:
    """field -> {"old": rule, "new": rule} for each field whose rule changes."""
    a = old.document() if old is not None else {}
    b = new.document()
    out = {}
    for name in (*POLICY_FIELDS, "hmac_key_id"):
        before = a.get(name, "drop" if name != "hmac_key_id" else None)
        after = b.get(name, "drop" if name != "hmac_key_id" else None)
        if before != after:
            out[name] = {"old": before, "new": after}
    return out
