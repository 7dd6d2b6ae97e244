"""`mailmeta token …`: API tokens (operators only; through the running pipeline's API)."""

from __future__ import annotations

from typing import Annotated

import typer

from mailmeta.cli._app import app
from mailmeta.cli._client import ApiClient, ApiOption, TokenOption, fail

token_app = typer.Typer(help="Create, list and revoke API tokens.", no_args_is_help=True)
app.add_typer(token_app, name="token")

SCOPE_HELP = "messages:read, stats:read, export or admin (repeat for several)."


@token_app.command("create")
def token_create(
    scope: Annotated[list[str], typer.Option("--scope", help=SCOPE_HELP)],
    customer: Annotated[
        str | None, typer.Option("--customer", help="Bind the token to this customer.")
    ] = None,
    all_customers: Annotated[
        bool, typer.Option("--all", help="An operator token: every customer.")
    ] = False,
    name: Annotated[str, typer.Option("--name", help="A label shown in `token list`.")] = "",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Create a token. It is printed once, here; only its hash is stored."""
    if (customer is None) == (not all_customers) or (customer and all_customers):
        fail("give exactly one of --customer ID or --all", code=2)
    with ApiClient(api, token) as client:
        body = client.post("/v1/tokens", json={"name": name, "customer": customer, "scopes": scope})
    typer.echo(f"token {body['id']} created for {body['customer'] or 'all customers'}: "
               f"{', '.join(body['scopes'])}", err=True)  # fmt: skip
    typer.echo("Store it now; it cannot be shown again:", err=True)
    typer.echo(body["token"])


@token_app.command("list")
def token_list(api: ApiOption = None, token: TokenOption = None) -> None:
    """Every token: id, name, customer, scopes, created, revoked."""
    with ApiClient(api, token) as client:
        tokens = client.get("/v1/tokens")["tokens"]
    typer.echo(f"{'ID':<13} {'NAME':<16} {'CUSTOMER':<12} {'CREATED':<25} {'REVOKED':<25} SCOPES")
    for t in tokens:
        typer.echo(
            f"{t['id']:<13} {t['name'][:16]:<16} {(t['customer'] or '*'):<12} "
            f"{t['created_at']:<25} {(t['revoked_at'] or '-'):<25} {','.join(t['scopes'])}"
        )


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (the part after mm_).")],
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Revoke a token; the very next request with it is refused."""
    with ApiClient(api, token) as client:
        t = client.request("DELETE", f"/v1/tokens/{token_id}").json()
    typer.echo(f"token {t['id']} revoked at {t['revoked_at']}")
