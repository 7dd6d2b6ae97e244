"""The query API, served from the process that owns the store (docs: one chdb owner).

``create_api`` builds the app from one router per resource; each handler reaches the store
and the customers through the dependencies in ``_deps`` (the app's own, in ``app.state``).
"""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from mailmeta.api import _erase, _export, _messages, _retention, _stats, _tokens, _webhooks
from mailmeta.api._errors import install_error_handlers
from mailmeta.api._export import ExportSlots
from mailmeta.api._headers import SecurityHeadersMiddleware
from mailmeta.api._health import DrainStatus, Health, drain_router, health_router
from mailmeta.api._in_force import PoliciesInForce
from mailmeta.api._openapi import openapi_of
from mailmeta.api._request_log import RequestLogMiddleware
from mailmeta.api._token_authority import TokenAuthority
from mailmeta.api._web import mount_web, web_router
from mailmeta.config import Customers, Settings
from mailmeta.store import Store


def create_api(
    store: Store,
    customers: Customers,
    drain_state: DrainStatus,
    health: Health | None = None,
    auth: TokenAuthority | None = None,
    exports: ExportSlots | None = None,
) -> FastAPI:
    """The FastAPI app. ``health`` adds parts (e.g. the consumer's state) to /healthz;
    ``auth`` turns bearer tokens on (None: every caller is the local operator); ``exports``
    bounds concurrent exports (None: the settings' defaults)."""
    app = FastAPI(
        title="mailmeta query API", docs_url=None, redoc_url=None, openapi_url="/openapi.json"
    )
    app.state.store = store
    app.state.customers = customers
    app.state.drain_state = drain_state
    app.state.health = health
    app.state.token_authority = auth
    app.state.export_slots = exports or export_slots(Settings.model_construct())
    # The customers file's policies until install_policies gives it the policies topic.
    app.state.policies = PoliciesInForce(store, None)
    app.add_middleware(RequestLogMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)  # outermost: errors get the headers too
    app.openapi = lambda: openapi_of(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    # Order kept from the first layout: the OpenAPI document lists paths as routes come.
    app.include_router(health_router)
    app.include_router(web_router)
    app.include_router(_messages.router)  # /v1/me, /v1/messages, /v1/messages/{id}
    app.include_router(_tokens.router)
    mount_web(app)
    for resource in (_retention, _erase, _export, _stats, _webhooks):
        app.include_router(resource.router)
    app.include_router(drain_router)
    return app


def export_slots(settings: Settings) -> ExportSlots:
    return ExportSlots(settings.api_export_max_per_customer, settings.api_export_max_total)


def server_config(app: FastAPI, host: str, port: int, trusted_proxies: list[str]) -> uvicorn.Config:
    """How the API is served. X-Forwarded-For/-Proto are believed only from
    ``trusted_proxies`` (networks): uvicorn's own default trusts loopback, which would let
    any local client — or one behind a proxy that passes the header on — choose the address
    its failed logins are counted against."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        proxy_headers=bool(trusted_proxies),
        forwarded_allow_ips=list(trusted_proxies),
    )
