"""Redaction policy API (admin): list, show, validate, preview, set (+ apply to stored), audit.

A change is validated by the redaction worker's own check, published to the compacted
policies topic as the next free version (above every number the topic and the history hold;
``PolicyLog.publish_next``; every redaction worker's policy table picks it up within a
fetch), its document kept in ``policy_versions`` and recorded in the audit log. Invalid input is a 4xx naming the field
and the reason, and the policy in force stays in force.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mailmeta.api._applied import AppliedDep, AppliedStatus
from mailmeta.api._deps import Admin, CustomersDep, StoreDep, known
from mailmeta.api._in_force import InForceDep, PoliciesInForce
from mailmeta.api._policy_ops import (
    PolicyInvalid,
    apply_to_stored,
    newest_stored,
    on_invalid,
    parse_policy,
    preview_row,
    remember,
    stored_policies,
)
from mailmeta.config import Customer, Customers, Policy, Settings
from mailmeta.policy import PREVIEW_NOTE, PolicyLog, PolicyRecord, VersionTaken, diff
from mailmeta.schema import now_ms
from mailmeta.store import Store

log = logging.getLogger("mailmeta.api.policies")

MAX_SAMPLE = 200

router = APIRouter(prefix="/v1/policies")


class PolicyBody(BaseModel):
    model_config = ConfigDict(strict=True)  # a bool or "30" is not a number
    policy: dict[str, Any]
    customer: str | None = None


class SetBody(BaseModel):
    model_config = ConfigDict(strict=True)  # a bool or "30" is not a number
    policy: dict[str, Any]
    apply_to_stored: bool = False
    # Optimistic concurrency: refuse when the version in force is no longer this one.
    expected_version: int | None = Field(default=None, ge=1)


class PreviewBody(BaseModel):
    model_config = ConfigDict(strict=True)  # a bool or "30" is not a number
    policy: dict[str, Any] | None = None  # None: the policy in force
    sample: int = Field(default=10, ge=1, le=MAX_SAMPLE)


def install_policies(
    app: FastAPI, settings: Settings, customers: Customers, store: Store
) -> PolicyLog:
    """Wire the policy API to the policies topic and seed it from the config; the caller
    closes the returned log when the app stops.

    A broker that cannot be reached here does not stop the sink: workers fall back to the
    config's policies, and the API answers 503 until the topic can be read.
    """
    policy_log = PolicyLog(settings)
    app.state.policy_log = policy_log
    app.state.policies = PoliciesInForce(store, policy_log)
    app.state.applied = AppliedStatus(settings)
    # This region's policies topic and store hold only this region's customers.
    mine = customers.regional()
    try:
        for rec in policy_log.seed(mine, newest_stored(store, mine)):
            if rec.source == "config":  # a restored version is in the history already
                remember(store, rec, "policy.seed", None)
    except Exception as exc:
        log.warning("could not seed the policies topic %s: %s", settings.policies_topic, exc)
    app.add_exception_handler(PolicyInvalid, on_invalid)
    app.include_router(router)
    return policy_log


def get_policy_log(request: Request) -> PolicyLog:
    pl: PolicyLog | None = getattr(request.app.state, "policy_log", None)
    if pl is None:
        raise HTTPException(503, "policies are not available in this process")
    return pl


PolicyLogDep = Annotated[PolicyLog, Depends(get_policy_log)]


def describe(customers: Customers, rec: PolicyRecord) -> dict[str, Any]:
    # The file's version, so `mailmeta policy list` shows a stale customers file.
    cfg = customers.by_id[rec.customer_id].policy_version
    return {**rec.to_json(), "config_version": cfg, "config_is_stale": cfg < rec.version}


def _customer(customers: Customers, customer: str) -> Customer:
    return known(customers, customer, f"unknown customer {customer!r}")


@router.get("")
def list_policies(
    _p: Admin, customers: CustomersDep, _pl: PolicyLogDep, live: InForceDep, applied: AppliedDep
) -> JSONResponse:
    # Other regions' policies are theirs to list.
    recs = live.records(customers.regional(), strict=True)
    by_workers = applied.of(recs)
    return JSONResponse(
        {"policies": [{**{k: v for k, v in describe(customers, r).items() if k != "policy"},
                       "applied": by_workers[r.customer_id]} for r in recs.values()]}
    )  # fmt: skip


@router.get("/{customer}")
def show(
    customer: str,
    _p: Admin,
    store: StoreDep,
    customers: CustomersDep,
    _pl: PolicyLogDep,
    live: InForceDep,
    applied: AppliedDep,
) -> JSONResponse:
    _customer(customers, customer)
    rec = live.records(customers, strict=True)[customer]
    history = store.policy_versions(customer)
    problems = live.problems(customer)
    recorded = history.get(rec.version)
    if recorded is not None and recorded["digest"] != rec.policy.digest():
        problems.append({"problem": f"version {rec.version} in the topic is not the document "
                                    "the history holds for it"})  # fmt: skip
    return JSONResponse(
        {
            **describe(customers, rec),
            "applied": applied.of({customer: rec})[customer],
            "digest": rec.policy.digest(),
            "problems": problems,
            "history": [{"version": v, **h} for v, h in history.items()],
        }
    )


@router.post("/validate")
def validate(body: PolicyBody, _p: Admin, customers: CustomersDep) -> JSONResponse:
    c = _customer(customers, body.customer) if body.customer else None
    policy = parse_policy(body.policy, c)
    return JSONResponse({"ok": True, "policy": policy.document()})


@router.post("/{customer}/preview")
def preview(
    customer: str,
    body: PreviewBody,
    _p: Admin,
    store: StoreDep,
    customers: CustomersDep,
    _pl: PolicyLogDep,
    live: InForceDep,
) -> JSONResponse:
    c = _customer(customers, customer)
    current = live.records(customers, strict=True)[customer]
    proposed = parse_policy(body.policy, c) if body.policy is not None else current.policy
    versions = stored_policies(store, customers, customer, current)
    rows = store.query_messages(customer, limit=body.sample)
    return JSONResponse(
        {
            "customer_id": customer,
            "in_force_version": current.version,
            "proposed": proposed.document(),
            "diff": diff(current.policy, proposed),
            "rows": [preview_row(c, r, versions.get(r["policy_version"]), proposed) for r in rows],
            "note": PREVIEW_NOTE,
        }
    )


def _publish_next(
    pl: PolicyLog,
    live: PoliciesInForce,
    store: Store,
    customers: Customers,
    customer: str,
    body: SetBody,
    policy: Policy,
    actor: str,
) -> tuple[PolicyRecord, PolicyRecord]:
    """Publishes the next version (above the topic's and the history's); returns (old,
    new). 409 when ``expected_version`` is no longer in force."""
    floor = max(store.policy_versions(customer), default=0)
    try:
        old, rec = pl.publish_next(
            customers,
            customer,
            lambda n: PolicyRecord(customer, n, policy, actor, now_ms(), "api"),
            floor=floor,
            expected=body.expected_version,
        )
    except VersionTaken as exc:
        raise HTTPException(
            409, f"version in force is {exc.in_force}, not {body.expected_version}"
        ) from None
    except Exception as exc:
        log.error("publishing a policy of %s failed: %s", customer, exc)
        raise HTTPException(503, "policies topic unavailable; nothing changed") from None
    live.published(rec)
    return old, rec


@router.put("/{customer}")
def set_policy(
    customer: str,
    body: SetBody,
    principal: Admin,
    store: StoreDep,
    customers: CustomersDep,
    pl: PolicyLogDep,
    live: InForceDep,
) -> JSONResponse:
    c = _customer(customers, customer)
    policy = parse_policy(body.policy, c)
    old, rec = _publish_next(pl, live, store, customers, customer, body, policy, principal.name)
    remember(store, rec, "policy.set", old)
    result: dict[str, Any] = {
        "customer_id": customer,
        "old_version": old.version,
        "version": rec.version,
        "diff": diff(old.policy, policy),
    }
    if body.apply_to_stored:
        result["applied_to_stored"] = apply_to_stored(store, customers, c, rec, principal.name)
    return JSONResponse(result)


@router.get("/{customer}/audit")
def audit(
    customer: str, _p: Admin, store: StoreDep, customers: CustomersDep, limit: int = 100
) -> JSONResponse:
    _customer(customers, customer)
    rows = [r for r in store.read_audit(customer, limit=min(max(limit, 1), 1000))
            if str(r["action"]).startswith("policy.")]  # fmt: skip
    return JSONResponse({"audit": rows})
