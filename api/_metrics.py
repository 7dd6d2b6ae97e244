"""Prometheus metrics of the query API.

They live in the process's default registry, which the service serves on
MAILMETA_SINK_METRICS_PORT (the API and the sink share the storage owner's process; the API's
own port needs tokens). Labels are bounded: the route *template*
(``/v1/messages/{event_id}``, never the URL, so no customer id or value becomes a series),
a known method, the status code.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "mailmeta_api_requests",
    "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
)
REQUEST_SECONDS = Histogram(
    "mailmeta_api_request_seconds",
    "Time to answer a request (a streamed export: until its last byte), by method and route "
    "template",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0),
)
RATE_LIMITED = Counter(
    "mailmeta_api_rate_limited",
    "Requests refused with 429, by the limit hit (token: the token's rate; failures: the "
    "client address's failed authentications; export: concurrent exports)",
    ["limit"],
)
TOKEN_FAILURES = Counter(
    "mailmeta_api_token_failures",
    "Failed token checks, by reason (missing: no bearer token; malformed: not a mailmeta "
    "token; invalid: unknown, wrong secret or revoked)",
    ["reason"],
)

NO_ROUTE = "(no route)"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def observe(method: str, route: str, status: int, seconds: float) -> None:
    """One answered request. ``route`` must be a template (or NO_ROUTE), never a path."""
    method = method if method in _METHODS else "other"  # a client chooses it: keep it bounded
    REQUESTS.labels(method=method, route=route, status=str(status)).inc()
    REQUEST_SECONDS.labels(method=method, route=route).observe(seconds)
