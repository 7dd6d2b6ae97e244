"""API tokens: created, listed, revoked and checked by one ``TokenAuthority`` per app.

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
import math
import re
import secrets
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import HTTPException, Request

from mailmeta.api import _metrics as metrics
from mailmeta.api._access_log import AccessLog
from mailmeta.api._principals import SCOPES, Principal
from mailmeta.api._ratelimit import RateLimiter
from mailmeta.store import TokenRecord, TokenStore

TOKEN_PREFIX = "mm_"
# mm_<12 hex id>_<43 url-safe base64 chars = 256 bits>
_TOKEN_RE = re.compile(r"^mm_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mailmeta"'}
_FAILED_TOO_OFTEN = "too many failed authentications from this address"


def new_token_parts() -> tuple[str, str]:
    return secrets.token_hex(6), secrets.token_urlsafe(32)


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    m = _TOKEN_RE.match(token)
    if m is None:
        return None
    token_id, secret = m.groups()
    return token_id, secret


def _no_gate() -> None:
    return None


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

    def _check(
        self, token_id: str, secret: str, before_hashing: Callable[[], None]
    ) -> TokenRecord | None:
        """The one check of a token: the live record it belongs to, or None (unknown, wrong
        secret, revoked). ``before_hashing`` runs only when argon2 work is needed, and may
        refuse it by raising."""
        self.refresh()  # what every replica created or revoked up to now
        record = self._memoised(token_id, secret)
        if record is None:
            before_hashing()
            record = self._verify_slow(token_id, secret)
        return record

    def verify(self, token: str) -> TokenRecord | None:
        """The live record ``token`` belongs to, or None (unknown, wrong secret, revoked)."""
        parts = split_token(token)
        return None if parts is None else self._check(*parts, _no_gate)

    def _refuse(self, ip: str, reason: str, message: str) -> HTTPException:
        """401 for a failed check, 429 once this client IP has failed too often."""
        metrics.TOKEN_FAILURES.labels(reason=reason).inc()
        wait = self.failures.take(ip)
        if wait > 0:
            return _too_many("failures", _FAILED_TOO_OFTEN, wait)
        return HTTPException(401, message, _CHALLENGE)

    def authenticate(self, request: Request) -> Principal:
        ip = request.client.host if request.client is not None else ""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise self._refuse(
                ip, "missing", "an API token is required (Authorization: Bearer mm_…)"
            )
        parts = split_token(token.strip())
        if parts is None:
            raise self._refuse(ip, "malformed", "invalid or revoked API token")
        token_id, secret = parts
        request.state.token_id = token_id

        def failure_budget() -> None:
            # argon2 costs tens of ms: an address over its failure budget gets none of it.
            wait = self.failures.retry_after(ip)
            if wait > 0:
                raise _too_many("failures", _FAILED_TOO_OFTEN, wait)

        # The secret is checked before any bucket of the token is charged: a caller who
        # knows only the id cannot spend the holder's budget.
        record = self._check(token_id, secret, failure_budget)
        if record is None:
            raise self._refuse(ip, "invalid", "invalid or revoked API token")
        wait = self.limiter.take(token_id)
        if wait > 0:
            raise _too_many("token", "rate limit exceeded for this token", wait)
        return Principal(record.name, record.scopes, record.customer_id, record.token_id)


def _too_many(limit: str, message: str, wait: float) -> HTTPException:
    metrics.RATE_LIMITED.labels(limit=limit).inc()
    return HTTPException(429, message, {"Retry-After": str(max(1, math.ceil(wait)))})
