"""`mailmeta webhooks`: run the webhook stage (endpoints are managed through the API)."""

from __future__ import annotations

import typer

from mailmeta.cli._app import app


@app.command("webhooks")
def webhooks() -> None:
    """Run the webhook stage: POST redacted events to customers' endpoints (MAILMETA_* settings)."""
    from mailmeta.webhooks import main

    raise typer.Exit(main())
