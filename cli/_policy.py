"""`mailmeta policy …`: redaction policies of the running pipeline (through its API)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError

from mailmeta.cli._app import app
from mailmeta.cli._client import ApiClient, ApiOption, TokenOption, fail
from mailmeta.config import ConfigError, Policy, load_yaml

policy_app = typer.Typer(
    help="Per-customer redaction policies: list, show, validate, preview, set.",
    no_args_is_help=True,
)
app.add_typer(policy_app, name="policy")

# How long `policy set` waits for the redaction workers by default.
DEFAULT_WAIT_S = 30.0
# States of a worker that waiting will not change (policy/_applied.py worker_state).
_SETTLED = frozenset({"applied", "refused", "different_digest", "missing"})


def _read(path: Path) -> dict[str, Any]:
    """A FILE: YAML shaped like a customer's `policy:` block."""
    try:
        data = load_yaml(path)
    except ConfigError as exc:
        fail(str(exc), 2)
    if isinstance(data, dict) and set(data) == {"policy"} and isinstance(data["policy"], dict):
        data = data["policy"]  # also accept the block with its `policy:` key
    if not isinstance(data, dict):
        fail(f"{path}: must be a mapping of field: action (a customer's policy: block)", 2)
    return data


def _problems(exc: ValidationError) -> str:
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("actions", "rules"))
        lines.append(f"  field {loc or 'policy'!r}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def _show(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False))


@policy_app.command("list")
def list_(api: ApiOption = None, token: TokenOption = None) -> None:
    """Each customer's policy version in force and where it came from."""
    with ApiClient(api, token) as client:
        rows = client.get("/v1/policies")["policies"]
    typer.echo(f"{'CUSTOMER':<24} {'VERSION':>7}  {'SOURCE':<7} {'BY':<20} AT")
    for r in rows:
        typer.echo(
            f"{r['customer_id']:<24} {r['version']:>7}  {r['source']:<7} {r['actor']:<20} {r['at']}"
        )
    for r in rows:
        if r.get("config_is_stale"):
            typer.echo(
                f"note: the customers file has policy_version {r['config_version']} for "
                f"{r['customer_id']}; version {r['version']} stays in force (not applied)"
            )


@policy_app.command("show")
def show(customer: str, api: ApiOption = None, token: TokenOption = None) -> None:
    """The policy in force for CUSTOMER (as YAML) and its version history."""
    with ApiClient(api, token) as client:
        r = client.get(f"/v1/policies/{customer}")
    typer.echo(f"# customer {r['customer_id']}: version {r['version']} ({r['source']}, "
               f"by {r['actor']} {r['at']})")  # fmt: skip
    typer.echo(yaml.safe_dump(r["policy"], sort_keys=False, allow_unicode=True).rstrip())
    if r.get("history"):
        typer.echo("# history: " + ", ".join(
            f"v{h['version']} {h['source']} by {h['actor']} {h['at']}" for h in r["history"]
        ))  # fmt: skip


@policy_app.command("validate")
def validate(
    path: Path,
    customer: Annotated[
        str | None,
        typer.Option(help="Also check it against this customer's keys (asks the API)."),
    ] = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Check a policy FILE; errors name the field and the reason. Changes nothing."""
    doc = _read(path)
    try:
        Policy.model_validate(doc)
    except ValidationError as exc:
        fail(f"{path}: invalid policy:\n{_problems(exc)}", 2)
    if customer:
        with ApiClient(api, token) as client:
            client.post("/v1/policies/validate", json={"policy": doc, "customer": customer})
    typer.echo(f"{path}: policy OK")


@policy_app.command("preview")
def preview(
    customer: str,
    path: Annotated[
        Path | None, typer.Argument(help="Proposed policy (default: in force).")
    ] = None,
    sample: Annotated[int, typer.Option(help="How many of the newest stored rows.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """For the last N stored rows of CUSTOMER: each field before and after the proposed
    policy (what --apply-to-stored would write). Changes nothing."""
    body: dict[str, Any] = {"sample": sample}
    if path is not None:
        body["policy"] = _read(path)
    with ApiClient(api, token) as client:
        r = client.post(f"/v1/policies/{customer}/preview", json=body)
    if as_json:
        _show(r)
        return
    typer.echo(f"# customer {customer}: version in force {r['in_force_version']}")
    for name, d in r["diff"].items():
        typer.echo(f"#   {name}: {d['old']} -> {d['new']}")
    for row in r["rows"]:
        typer.echo(
            f"{row['event_id']}  {row['received_at']}  (stored under v{row['stored_version']})"
        )
        for name, f in row["fields"].items():
            mark = "  " if f["change"] == "unchanged" else "* "
            typer.echo(f"  {mark}{name:<14} {f['before']!r} -> {f['after']!r}"
                       + ("" if f["change"] == "unchanged" else f"   ({f['why']})"))  # fmt: skip
    typer.echo(f"# {r['note']}")


@policy_app.command("set")
def set_(
    customer: str,
    path: Path,
    apply_to_stored: Annotated[
        bool,
        typer.Option(
            "--apply-to-stored",
            help="Also rewrite CUSTOMER's stored rows where the new policy is stricter.",
        ),
    ] = False,
    expected_version: Annotated[
        int | None, typer.Option(help="Refuse unless this version is in force.")
    ] = None,
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            min=0,
            help="Seconds to wait until every live redaction worker applies the new version; "
            "exit 1 naming those that did not (lagging, refused).",
        ),
    ] = DEFAULT_WAIT_S,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return once published, without waiting.")
    ] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Make FILE the policy of CUSTOMER (a new version, audited), and wait until the
    redaction workers apply it."""
    doc = _read(path)
    try:
        Policy.model_validate(doc)
    except ValidationError as exc:
        fail(f"{path}: invalid policy; nothing changed:\n{_problems(exc)}", 2)
    body = {"policy": doc, "apply_to_stored": apply_to_stored}
    if expected_version is not None:
        body["expected_version"] = expected_version
    with ApiClient(api, token) as client:
        r = client.request("PUT", f"/v1/policies/{customer}", json=body).json()
        typer.echo(f"customer {customer}: policy v{r['old_version']} -> v{r['version']}")
        for name, d in r["diff"].items():
            typer.echo(f"  {name}: {d['old']} -> {d['new']}")
        applied = r.get("applied_to_stored")
        if applied is not None:
            typer.echo(f"  stored rows rewritten: {applied['rows_rewritten']}")
        if not no_wait:
            wait_applied(client, customer, r["version"], wait)


def wait_applied(client: ApiClient, customer: str, version: int, timeout: float) -> None:
    """Poll the API until every live worker applies ``version`` of ``customer`` or none can
    change any more, printing each change of progress; exit 1 naming the workers that do
    not apply it."""
    deadline = time.monotonic() + timeout
    shown = ""
    while True:
        a = client.get(f"/v1/policies/{customer}")["applied"]
        if a["version"] > version:
            typer.echo(f"  v{a['version']} was published since: v{version} is superseded")
            return
        rows = a["by_worker"] if a["version"] == version else []
        line = (
            f"  v{version}: applied by {a['applied_by'] if rows else 0} of {a['workers']} "
            "live redaction workers"
            if not a.get("error")
            else f"  v{version}: {a['error']}"
        )
        if line != shown:
            typer.echo(line)
            shown = line
        done = (
            not a.get("error")
            and a["version"] == version
            and all(w["state"] in _SETTLED for w in rows)
        )
        if done or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if a.get("error"):
        fail(f"v{version} of {customer} is published; cannot tell who applies it: {a['error']}")
    if a["workers"] == 0:
        typer.echo(
            f"  note: no live redaction worker reported within {a['stale_after_s']} s; "
            "workers read the newest version before they redact anything"
        )
        return
    missing = [w for w in rows if w["state"] != "applied"] if rows else a["by_worker"]
    if not missing:
        return
    lines = "".join(
        f"\n  {w['worker']}: {w['state'] if rows else 'lagging'}"
        + (f" (holds v{w['version']})" if w["version"] is not None else "")
        + (f": {w['reason']}" if w.get("reason") else "")
        for w in missing
    )
    fail(
        f"v{version} of {customer} is published but not applied by {len(missing)} of "
        f"{a['workers']} live redaction workers{'' if done else f' after {timeout:g} s'}:{lines}"
    )


@policy_app.command("audit")
def audit(
    customer: str,
    limit: Annotated[int, typer.Option(help="Newest N records.")] = 20,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Policy changes of CUSTOMER from the audit log (who, when, old -> new, diff)."""
    with ApiClient(api, token) as client:
        rows = client.get(f"/v1/policies/{customer}/audit", params={"limit": limit})["audit"]
    for r in rows:
        typer.echo(f"{r['at']}  {r['actor']:<20} {r['action']:<24} {json.dumps(r['details'])}")
