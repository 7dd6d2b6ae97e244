"""The stored forms of a clear value: what to look for when searching or erasing it.

A value is stored clear (``keep``) or as an HMAC tagged with the key id (``k1:hex``);
rows from before key ids were tagged carry the bare hex. Searching needs every form under
every key the customer has (``hmac_keys`` rotation), erasing needs the same. Which forms a
search may find depends on every policy version rows may be stored under, not only the one in
force.
"""

from __future__ import annotations

from collections.abc import Iterable

from mailmeta.config import Action, Customer, Policy
from mailmeta.policy._redact import hmac_hex, hmac_tagged

# Actions whose stored form can be recomputed from the clear value, so an exact match works.
_EXACT = frozenset({Action.keep, Action.hmac})


class UnsearchableField(ValueError):
    """The customer's policy stores this field in a form no clear value can match exactly."""


def stored_forms(values: Iterable[str], keys: dict[str, bytes]) -> list[str]:
    """Every form ``values`` may be stored in: clear, and HMAC'd under each key, tagged with
    the key id and untagged."""
    clear = list(dict.fromkeys(values))
    out = list(clear)
    for key_id, key in keys.items():
        for v in clear:
            out += [hmac_tagged(key_id, key, v), hmac_hex(key, v)]
    return out


def stored_as(policies: Iterable[Policy], field: str) -> set[Action]:
    """How ``field`` is stored under any of ``policies`` (the versions rows may be stored
    under: a change in force applies to new rows only, unless applied to stored ones)."""
    return {p.action_for(field) for p in policies}


def search_forms(
    customer: Customer, field: str, value: str | None, policies: Iterable[Policy]
) -> tuple[str, ...]:
    """The stored forms to match for an exact search of ``field`` = ``value`` over rows stored
    under any of ``policies``: after keep -> hmac (or back) both forms are looked for, so rows
    from before and after the change match.

    Raises UnsearchableField when no version stores the field in a form an exact value can
    match (mask, truncate...), rather than let a search silently find nothing; OSError/ValueError
    when a key cannot be read.
    """
    if value is None:
        return ()
    actions = stored_as(policies, field)
    if not actions & _EXACT:
        how = ", ".join(sorted(a.value for a in actions))
        raise UnsearchableField(
            f"{field} is stored as {how} by this customer's policy and cannot be "
            "searched by exact value"
        )
    return tuple(stored_forms([value], customer.keys()))
