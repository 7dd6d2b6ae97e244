"""`mailmeta config …`: check configuration files offline."""

from __future__ import annotations

from pathlib import Path

import typer

from mailmeta.cli._app import app
from mailmeta.cli._client import fail
from mailmeta.config import ConfigError, load_customers

config_app = typer.Typer(help="Check configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("validate")
def config_validate(path: Path) -> None:
    """Validate a customers YAML file; errors name the file, customer and field."""
    try:
        customers = load_customers(path)
    except ConfigError as exc:
        fail(str(exc), 2)
    typer.echo(f"{path}: {len(customers)} customer(s) OK")
    if customers.regions:  # where each region's customers are served (and their data kept)
        for region in customers.region_names():
            ids = sorted(c.id for c in customers.serving(region).here())
            typer.echo(f"  region {region}: {', '.join(ids) or '(no customers)'}")


@config_app.command("hash-password")
def config_hash_password(
    password: str = typer.Option(
        ..., prompt=True, hide_input=True, confirmation_prompt=True, help="The SMTP AUTH password."
    ),
) -> None:
    """Print the argon2 hash to put in a customer's `smtp_users[].password_hash`."""
    from mailmeta.ingest import hash_password

    if len(password) < 8:
        typer.echo("mailmeta: password: use at least 8 characters", err=True)
        raise typer.Exit(2)
    typer.echo(hash_password(password))
