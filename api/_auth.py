"""Who is calling the API: the seam every route's access check goes through.

Routes declare what they need with ``Depends(require("scope"))`` and check customers with
``principal.check_customer(id)``. With ``api_auth`` off (no TokenAuthority on the app) every
caller is the local operator (all scopes, all customers); with it on, every request carries
``Authorization: Bearer mm_<id>_<secret>``.

Token design. The id is visible (it names the token in lists and logs); the secret is 256
random bits, stored only as an argon2id hash (argon2-cffi). Argon2 is deliberately slow, so
after one successful verification the authority remembers an HMAC of the secret under a
per-process random key, in memory, next to the token's state; revoking drops it in the same
step, so the memo can never outlive a revocation.

Replicas. The store is the authority, shared by every API replica over one ClickHouse: each
request first asks it for a fingerprint of all tokens' states (``tokens_stamp``, one small
FINAL query) and reloads the tokens when it changed, so a token created or revoked through
any replica is honoured by every replica on its next request; nothing is cached past that.
Rate limits are per replica (in memory): a shared counter would cost a store write per
request, so a client spread over N replicas gets up to N times the per-token rate.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import HTTPException, Request

from mailmeta.store import AccessRecord, TokenRecord, TokenStore

log = logging.getLogger("mailmeta.api.auth")

SCOPES = frozenset({"messages:read", "stats:read", "export", "webhooks", "admin"})
TOKEN_PREFIX = "mm_"
# mm_<12 hex id>_<43 url-safe base64 chars = 256 bits>
_TOKEN_RE = re.compile(r"^mm_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
OPERATOR_TOKEN_NAME = "operator"


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    scopes: frozenset[str]
    customer: str | None  # None: every customer (operators)
    token_id: str | None = None

    def check_customer(self, customer: str) -> None:
        """403 unless this caller may see ``customer``'s data."""
        if self.customer is not None and self.customer != customer:
            raise HTTPException(403, "this token is not allowed to access that customer")

    def customer_or(self, customer: str | None) -> str:
        """The customer a request is about: the token's own when it names none."""
        if customer is None:
            if self.customer is None:
                raise HTTPException(400, "'customer' is required for operator tokens")
            return self.customer
        self.check_customer(customer)
        return customer


LOCAL_OPERATOR = Principal("local-operator", SCOPES, None)


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class RateLimiter:
    """Token buckets by key (an API token's id, a client IP), in this process: ``burst``
    requests, refilled at ``rate``/s.

    Memory is bounded: a bucket untouched for ``burst / rate`` seconds is full again, the
    same as a new one, so it is dropped; and at most ``max_keys`` buckets are kept (the
    least recently used go first).
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst and max_keys >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._refill_s = self.burst / rate
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

    def _evict(self, now: float) -> None:
        # Least recently used first: stop at the first bucket still refilling.
        while self._buckets:
            key, oldest = next(iter(self._buckets.items()))
            if len(self._buckets) <= self.max_keys and now - oldest.stamp < self._refill_s:
                break
            del self._buckets[key]

    def _level(self, b: _Bucket, now: float) -> float:
        return min(self.burst, b.tokens + (now - b.stamp) * self.rate)

    def take(self, key: str) -> float:
        """0 when the request may go ahead (and charge it), else the seconds until it may."""
        now = time.monotonic()
        with self._lock:
            b = self._buckets.pop(key, None)
            if b is None:
                b = _Bucket(self.burst, now)
            b.tokens = self._level(b, now)
            b.stamp = now
            self._buckets[key] = b  # most recently used: last
            self._evict(now)
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return 0.0
            return (1.0 - b.tokens) / self.rate

    def wait(self, key: str) -> float:
        """Like ``take`` without charging: 0 when a request would be let through."""
        now = time.monotonic()
        with self._lock:
            b = self._buckets.get(key)
            level = self.burst if b is None else self._level(b, now)
        return 0.0 if level >= 1.0 else (1.0 - level) / self.rate


class AccessLog:
    """Request metadata (time, route, status, latency, token id) written in batches.

    One ClickHouse insert per request would make a part per request; a background thread
    flushes what accumulated every ``interval`` seconds instead.
    """

    def __init__(self, store: TokenStore, interval: float = 1.0, max_pending: int = 100_000):
        self._store = store
        self._interval = interval
        self._max = max_pending
        self._pending: list[AccessRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mailmeta-access-log", daemon=True)
        self._thread.start()

    def add(self, record: AccessRecord) -> None:
        with self._lock:
            if len(self._pending) < self._max:  # bounded: drop rather than grow without end
                self._pending.append(record)

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            try:
                self._store.append_access(batch)
            except Exception as exc:  # a lost access-log batch must not stop the API
                log.warning("could not write %s access-log records: %s", len(batch), exc)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def close(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.flush()


def new_token_parts() -> tuple[str, str]:
    return secrets.token_hex(6), secrets.token_urlsafe(32)


class TokenAuthority:
    """Creates, lists, revokes and checks API tokens (see the module docstring).

    Rate limits: ``limiter`` charges a token's bucket only once its secret is proven (so
    knowing an id buys nothing); ``failures`` charges the client IP for every bad, revoked or
    missing token, and an IP over that budget gets 429 without any argon2 work (a token this
    process already verified still passes: its check is one HMAC).
    """

    def __init__(
        self,
        store: TokenStore,
        *,
        rate_per_s: float = 20.0,
        burst: int = 60,
        failure_rate_per_s: float = 1.0,
        failure_burst: int = 30,
        max_buckets: int = 10_000,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self.store = store
        # OWASP's argon2id minimum (19 MiB, t=2, p=1): the secrets are random, so the hash
        # guards against a stolen table, not a weak password; the memo keeps requests fast.
        self.hasher = hasher or PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
        self.limiter = RateLimiter(rate_per_s, burst, max_buckets)
        self.failures = RateLimiter(failure_rate_per_s, failure_burst, max_buckets)
        self.access = AccessLog(store)
        self._memo_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._tokens: dict[str, TokenRecord] = {}
        self._verified: dict[str, bytes] = {}
        self._stamp: tuple[int, int] | None = None
        self._reload_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------

    def load(self) -> TokenAuthority:
        self.refresh()
        self.access.start()
        return self

    def refresh(self) -> None:
        """Reload the tokens when the store's state differs from what this process holds
        (another replica, or this one, created or revoked a token). The stamp is read before
        the tokens, so what is loaded is never older than the stamp remembered."""
        stamp = self.store.tokens_stamp()
        if stamp == self._stamp:
            return
        with self._reload_lock:
            tokens = {t.token_id: t for t in self.store.load_tokens()}
            with self._lock:
                # A memo survives only for a token whose state is the same and live.
                for token_id in list(self._verified):
                    old, new = self._tokens.get(token_id), tokens.get(token_id)
                    if (
                        old is None
                        or new is None
                        or new.revoked_at is not None
                        or new.secret_hash != old.secret_hash
                    ):
                        del self._verified[token_id]
                self._tokens = tokens
                self._stamp = stamp

    def close(self) -> None:
        self.access.close()

    # --- management ----------------------------------------------------------------------------

    def create(
        self, name: str, customer: str | None, scopes: Iterable[str]
    ) -> tuple[TokenRecord, str]:
        """A new token; returns its record and the clear token (shown once, never stored)."""
        scope_set = frozenset(scopes)
        unknown = scope_set - SCOPES
        if unknown or not scope_set:
            raise ValueError(f"scopes must be among {', '.join(sorted(SCOPES))}")
        if "admin" in scope_set and customer is not None:
            raise ValueError("the 'admin' scope is for operator tokens (all customers) only")
        token_id, secret = new_token_parts()
        record = TokenRecord(
            token_id=token_id,
            name=name,
            customer_id=customer,
            scopes=scope_set,
            secret_hash=self.hasher.hash(secret),
            created_at=datetime.now(UTC),
        )
        self.store.save_token(record)  # durable first: a token that works is a stored token
        with self._lock:
            self._tokens[token_id] = record
        return record, f"{TOKEN_PREFIX}{token_id}_{secret}"

    def revoke(self, token_id: str) -> TokenRecord | None:
        """Revoke now (in memory first, so the next request fails), then persist."""
        with self._lock:
            record = self._tokens.get(token_id)
            if record is None:
                return None
            if record.revoked_at is None:
                record.revoked_at = datetime.now(UTC)
            self._verified.pop(token_id, None)
        self.store.save_token(record)
        return record

    def tokens(self) -> list[TokenRecord]:
        with self._lock:
            return sorted(self._tokens.values(), key=lambda t: t.created_at)

    def get(self, token_id: str) -> TokenRecord | None:
        with self._lock:
            return self._tokens.get(token_id)

    # --- checking ----------------------------------------------------------------------------

    def _memo(self, secret: str) -> bytes:
        return hmac.new(self._memo_key, secret.encode(), hashlib.sha256).digest()

    def _live(self, token_id: str) -> TokenRecord | None:
        with self._lock:
            record = self._tokens.get(token_id)
        return record if record is not None and record.revoked_at is None else None

    def _memoised(self, token_id: str, secret: str) -> TokenRecord | None:
        """The live record when this secret was verified before (one HMAC), else None."""
        with self._lock:
            record = self._tokens.get(token_id)
            memo = self._verified.get(token_id)
        if record is None or record.revoked_at is not None or memo is None:
            return None
        return record if hmac.compare_digest(memo, self._memo(secret)) else None

    def _verify_slow(self, token_id: str, secret: str) -> TokenRecord | None:
        record = self._live(token_id)
        if record is None:
            return None
        try:
            self.hasher.verify(record.secret_hash, secret)
        except (VerificationError, InvalidHashError):
            return None
        with self._lock:
            # Revoked (here or, seen by a reload, elsewhere) while we hashed: the revocation
            # wins, and nothing is memoised.
            now = self._tokens.get(token_id)
            if (
                record.revoked_at is not None
                or now is None
                or now.revoked_at is not None
                or now.secret_hash != record.secret_hash
            ):
                return None
            self._verified[token_id] = self._memo(secret)
        return now

    def verify(self, token: str) -> TokenRecord | None:
        """The live record ``token`` belongs to, or None (unknown, wrong secret, revoked)."""
        m = _TOKEN_RE.match(token)
        if m is None:
            return None
        token_id, secret = m.groups()
        self.refresh()
        return self._memoised(token_id, secret) or self._verify_slow(token_id, secret)

    def _refuse(self, ip: str, message: str) -> HTTPException:
        """401 for a failed check, 429 once this client IP has failed too often."""
        wait = self.failures.take(ip)
        if wait > 0:
            return _too_many("too many failed authentications from this address", wait)
        return HTTPException(401, message, _CHALLENGE)

    def authenticate(self, request: Request) -> Principal:
        ip = request.client.host if request.client is not None else ""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise self._refuse(ip, "an API token is required (Authorization: Bearer mm_…)")
        m = _TOKEN_RE.match(token.strip())
        if m is None:
            raise self._refuse(ip, "invalid or revoked API token")
        token_id, secret = m.groups()
        request.state.token_id = token_id
        self.refresh()  # what every replica created or revoked up to now
        # The secret is checked before any bucket of the token is charged: a caller who
        # knows only the id cannot spend the holder's budget.
        record = self._memoised(token_id, secret)
        if record is None:
            # argon2 costs tens of ms: an address over its failure budget gets none of it.
            wait = self.failures.wait(ip)
            if wait > 0:
                raise _too_many("too many failed authentications from this address", wait)
            record = self._verify_slow(token_id, secret)
        if record is None:
            raise self._refuse(ip, "invalid or revoked API token")
        wait = self.limiter.take(token_id)
        if wait > 0:
            raise _too_many("rate limit exceeded for this token", wait)
        return Principal(record.name, record.scopes, record.customer_id, record.token_id)


def _too_many(message: str, wait: float) -> HTTPException:
    return HTTPException(429, message, {"Retry-After": str(max(1, math.ceil(wait)))})


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mailmeta"'}


def authority_of(request: Request) -> TokenAuthority | None:
    return getattr(request.app.state, "token_authority", None)


def current_principal(request: Request) -> Principal:
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    authority = authority_of(request)
    principal = LOCAL_OPERATOR if authority is None else authority.authenticate(request)
    request.state.principal = principal
    return principal


def require(scope: str) -> Callable[[Request], Principal]:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def dependency(request: Request) -> Principal:
        principal = current_principal(request)
        if scope not in principal.scopes and "admin" not in principal.scopes:
            raise HTTPException(403, f"this token lacks the {scope!r} scope")
        return principal

    return dependency


def require_operator(request: Request) -> Principal:
    """Admin over every customer: token management."""
    principal = require("admin")(request)
    if principal.customer is not None:
        raise HTTPException(403, "only operator tokens (all customers) may do this")
    return principal


# --- the operator token file (bootstrap for `mailmeta up`) -------------------------------------


def ensure_operator_token(authority: TokenAuthority, path: Path) -> bool:
    """Make ``path`` hold a working operator token; True when a new one was written.

    Keeps the file when its token still works. Otherwise creates an operator token (all
    customers, all scopes) and writes it with mode 0600 — never to logs, env or argv.
    """
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing and authority.verify(existing) is not None:
        return False
    _, token = authority.create(OPERATOR_TOKEN_NAME, None, SCOPES)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    log.info("operator API token written to %s", path)
    return True


class AccessLogMiddleware:
    """ASGI middleware logging each /v1 request's metadata (never query string or body)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            app_state = getattr(scope.get("app"), "state", None)
            authority: TokenAuthority | None = getattr(app_state, "token_authority", None)
            if authority is not None:
                route = scope.get("route")
                state = scope.get("state") or {}
                authority.access.add(
                    AccessRecord(
                        at=datetime.now(UTC),
                        token_id=str(state.get("token_id") or ""),
                        method=str(scope.get("method", "")),
                        # The route template (/v1/messages/{event_id}), never the URL.
                        route=str(getattr(route, "path", "") or "(no route)"),
                        status=status,
                        latency_ms=(time.perf_counter() - start) * 1000,
                    )
                )
