"""Redaction policy API (admin): list, show, validate, preview, set (+ apply to stored).

A change is validated, published to the compacted policies topic as version N+1 (every
redaction worker's policy table picks it up within a fetch), its document kept in
``policy_versions`` and recorded in the audit log. Invalid input is a 4xx naming the field
and the reason, and the policy in force stays in force.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from mailmeta.api._auth import Principal, require
from mailmeta.config import Customers, Policy, Settings
from mailmeta.policy import PREVIEW_NOTE, PolicyLog, PolicyRecord, diff, effective, plan, rewriter
from mailmeta.schema import now_ms
from mailmeta.store import Store

log = logging.getLogger("mailmeta.api.policies")

MAX_SAMPLE = 200
# Module level: routes' annotations are resolved here (``from __future__ import annotations``).
Admin = Annotated[Principal, Depends(require("admin"))]


class PolicyBody(BaseModel):
    policy: dict[str, Any]
    customer: str | None = None


class SetBody(BaseModel):
    policy: dict[str, Any]
    apply_to_stored: bool = False
    # Optimistic concurrency: refuse when the version in force is no longer this one.
    expected_version: int | None = Field(default=None, ge=1)


class PreviewBody(BaseModel):
    policy: dict[str, Any] | None = None  # None: the policy in force
    sample: int = Field(default=10, ge=1, le=MAX_SAMPLE)


_NAMED = re.compile(r"field '([^']+)'")


def _problems(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p not in ("actions", "rules")]
        msg = e.get("msg", "").removeprefix("Value error, ")
        # A check over the whole mapping names its field in the message.
        named = _NAMED.search(msg)
        field = ".".join(loc) or (named.group(1) if named else "policy")
        out.append({"field": field, "problem": msg})
    return out


class PolicyInvalid(ValueError):
    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__("invalid policy")
        self.problems = problems


def _invalid(problems: list[dict[str, str]]) -> PolicyInvalid:
    return PolicyInvalid(problems)


async def _on_invalid(_request: Request, exc: Exception) -> JSONResponse:
    problems = exc.problems if isinstance(exc, PolicyInvalid) else []
    # Names the field and the reason; the policy in force is untouched.
    return JSONResponse({"error": "invalid policy", "problems": problems}, status_code=422)


def parse_policy(doc: dict[str, Any], customer: Any | None) -> Policy:
    """The policy, or a 422 naming each field and reason (keys checked for ``customer``)."""
    try:
        policy = Policy.model_validate(doc)
    except ValidationError as exc:
        raise _invalid(_problems(exc)) from None
    if customer is not None:
        problem = customer.policy_problem(policy)
        if problem:
            field, _, reason = problem.partition(": ")
            raise _invalid([{"field": field.removeprefix("field ").strip("'"), "problem": reason}])
    return policy


def install_policies(app: FastAPI, settings: Settings, customers: Customers, store: Store) -> None:
    """Wire the policy API to the policies topic and seed it from the config.

    A broker that cannot be reached here does not stop the sink: workers fall back to the
    config's policies, and the API answers 503 until the topic can be read.
    """
    policy_log = PolicyLog(settings)
    app.state.policy_log = policy_log
    try:
        for rec in policy_log.seed(customers, _newest_stored(store, customers)):
            if rec.source == "config":  # a restored version is in the history already
                _remember(store, rec, "policy.seed", None)
    except Exception as exc:
        log.warning("could not seed the policies topic %s: %s", settings.policies_topic, exc)
    app.add_exception_handler(PolicyInvalid, _on_invalid)
    app.include_router(policies_router(store, customers))


def _newest_stored(store: Store, customers: Customers) -> dict[str, PolicyRecord]:
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


def _remember(store: Store, rec: PolicyRecord, action: str, old: PolicyRecord | None) -> None:
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


def policies_router(store: Store, customers: Customers) -> APIRouter:
    router = APIRouter(prefix="/v1/policies")

    def log_of(request: Request) -> PolicyLog:
        pl: PolicyLog | None = getattr(request.app.state, "policy_log", None)
        if pl is None:
            raise HTTPException(503, "policies are not available in this process")
        return pl

    def in_force(pl: PolicyLog) -> dict[str, PolicyRecord]:
        try:
            return effective(customers, pl.read_all())
        except Exception as exc:
            log.error("reading the policies topic failed: %s", exc)
            raise HTTPException(503, "policies topic unavailable") from None

    def customer_of(customer: str) -> Any:
        c = customers.by_id.get(customer)
        if c is None:
            raise HTTPException(404, f"unknown customer {customer!r}")
        return c

    def describe(rec: PolicyRecord) -> dict[str, Any]:
        # The file's version, so `mailmeta policy list` shows a stale customers file.
        cfg = customers.by_id[rec.customer_id].policy_version
        return {**rec.to_json(), "config_version": cfg, "config_is_stale": cfg < rec.version}

    @router.get("")
    def list_policies(_p: Admin, request: Request) -> JSONResponse:
        recs = in_force(log_of(request))
        return JSONResponse(
            {"policies": [{k: v for k, v in describe(r).items() if k != "policy"}
                          for r in recs.values()]}
        )  # fmt: skip

    @router.get("/{customer}")
    def show(customer: str, _p: Admin, request: Request) -> JSONResponse:
        customer_of(customer)
        rec = in_force(log_of(request))[customer]
        history = store.policy_versions(customer)
        return JSONResponse(
            {**describe(rec), "history": [{"version": v, **h} for v, h in history.items()]}
        )

    @router.post("/validate")
    def validate(body: PolicyBody, _p: Admin) -> JSONResponse:
        c = customer_of(body.customer) if body.customer else None
        policy = parse_policy(body.policy, c)
        return JSONResponse({"ok": True, "policy": policy.document()})

    @router.post("/{customer}/preview")
    def preview(customer: str, body: PreviewBody, _p: Admin, request: Request) -> JSONResponse:
        c = customer_of(customer)
        current = in_force(log_of(request))[customer]
        proposed = parse_policy(body.policy, c) if body.policy is not None else current.policy
        versions = _stored_policies(store, customers, customer, current)
        rows = store.query_messages(customer, limit=body.sample)
        out = []
        for row in rows:
            old = versions.get(row["policy_version"])
            transitions = plan(old, proposed)
            after = rewriter(c, proposed, transitions)(row) or row
            out.append(
                {
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
            )
        return JSONResponse(
            {
                "customer_id": customer,
                "in_force_version": current.version,
                "proposed": proposed.document(),
                "diff": diff(current.policy, proposed),
                "rows": out,
                "note": PREVIEW_NOTE,
            }
        )

    @router.put("/{customer}")
    def set_policy(
        customer: str, body: SetBody, principal: Admin, request: Request
    ) -> JSONResponse:
        c = customer_of(customer)
        policy = parse_policy(body.policy, c)
        pl = log_of(request)
        with pl.lock:  # versions of one API never collide
            old = in_force(pl)[customer]
            if body.expected_version is not None and body.expected_version != old.version:
                raise HTTPException(
                    409, f"version in force is {old.version}, not {body.expected_version}"
                )
            rec = PolicyRecord(customer, old.version + 1, policy, principal.name, now_ms(), "api")
            try:
                pl.publish([rec])
            except Exception as exc:
                log.error("publishing policy v%s of %s failed: %s", rec.version, customer, exc)
                raise HTTPException(503, "policies topic unavailable; nothing changed") from None
        _remember(store, rec, "policy.set", old)
        result: dict[str, Any] = {
            "customer_id": customer,
            "old_version": old.version,
            "version": rec.version,
            "diff": diff(old.policy, policy),
        }
        if body.apply_to_stored:
            result["applied_to_stored"] = apply_to_stored(c, rec, principal.name)
        return JSONResponse(result)

    def apply_to_stored(c: Any, rec: PolicyRecord, actor: str) -> dict[str, Any]:
        versions = _stored_policies(store, customers, c.id, None)
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

    @router.get("/{customer}/audit")
    def audit(customer: str, _p: Admin, limit: int = 100) -> JSONResponse:
        customer_of(customer)
        rows = [r for r in store.read_audit(customer, limit=min(max(limit, 1), 1000))
                if str(r["action"]).startswith("policy.")]  # fmt: skip
        return JSONResponse({"audit": rows})

    return router


def _stored_policies(
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
