"""The query API: messages, stats, export, erasure, retention, policies, tokens, and the web
dashboard. Reads and writes storage only through ``mailmeta.store``; never imports a stage."""

from mailmeta.api._app import create_api, export_slots, server_config
from mailmeta.api._operator_token import ensure_operator_token
from mailmeta.api._policies import install_policies
from mailmeta.api._principals import SCOPES
from mailmeta.api._ratelimit import RateLimiter
from mailmeta.api._token_authority import TokenAuthority

__all__ = [
    "SCOPES",
    "RateLimiter",
    "TokenAuthority",
    "create_api",
    "ensure_operator_token",
    "export_slots",
    "install_policies",
    "server_config",
]
