"""Rate limits and token checks (issue 14.6): a wrong secret never charges the holder's
bucket, failed authentications are limited per client IP, idle buckets are evicted.

Each client binds its own loopback address (127.0.0.x), so the API sees distinct client IPs.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from argon2 import PasswordHasher

from mailmeta.api import RateLimiter
from tests.api_helpers import ApiServer, event


class CountingHasher(PasswordHasher):
    """The real argon2 hasher, counting verifications (each costs tens of ms)."""

    def __init__(self) -> None:
        super().__init__(time_cost=2, memory_cost=19456, parallelism=1)
        self.verifications = 0
        self._lock = threading.Lock()

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        with self._lock:
            self.verifications += 1
        return super().verify(hash, password)


@pytest.fixture
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path_factory.mktemp("limits"))
    server.auth.hasher = CountingHasher()
    server.start()
    server.store.insert_events([event("acme")])
    try:
        yield server
    finally:
        server.stop()


def client_from(api: ApiServer, ip: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.HTTPTransport(local_address=ip)
    return httpx.Client(base_url=api.url, headers=headers, timeout=30, transport=transport)


def test_a_wrong_secret_for_a_known_id_cannot_lock_the_holder_out(api: ApiServer) -> None:
    api.auth.limiter = RateLimiter(rate=0.1, burst=5)
    api.auth.failures = RateLimiter(rate=0.1, burst=5)
    token = api.token("acme", "messages:read")
    token_id = token.split("_")[1]
    with client_from(api, "127.0.0.1", token) as holder:
        assert holder.get("/v1/me").status_code == 200
        hasher = api.auth.hasher
        assert isinstance(hasher, CountingHasher)
        before = hasher.verifications
        forged = f"mm_{token_id}_{secrets.token_urlsafe(32)}"
        with client_from(api, "127.0.0.2", forged) as attacker:
            codes = [attacker.get("/v1/me").status_code for _ in range(20)]
        # The attacker's failures are his own: 401 while his address has budget, then 429.
        assert codes == [401] * 5 + [429] * 15, codes
        # Over budget, a forged secret gets no argon2 work at all.
        assert hasher.verifications - before == 5
        assert [holder.get("/v1/me").status_code for _ in range(4)] == [200] * 4


def test_failed_authentications_are_limited_per_client_ip(api: ApiServer) -> None:
    api.auth.failures = RateLimiter(rate=0.1, burst=4)
    good = api.token("acme", "messages:read")
    bad_tokens = [None, "not-a-token", f"mm_{secrets.token_hex(6)}_{'A' * 43}", good + "x"]
    with client_from(api, "127.0.0.3", None) as c:
        codes = [
            c.get("/v1/me", headers={"Authorization": f"Bearer {t}"} if t else {}).status_code
            for t in bad_tokens * 2
        ]
        assert codes == [401] * 4 + [429] * 4, codes
        r = c.get("/v1/me")
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"] and "Bearer" not in r.headers.get("WWW-Authenticate", "")
    # Another address is not affected, nor a valid token this process verified before.
    with client_from(api, "127.0.0.4", None) as other:
        assert other.get("/v1/me").status_code == 401
    with client_from(api, "127.0.0.1", good) as holder:
        assert holder.get("/v1/me").status_code == 200


def test_unknown_token_ids_create_no_buckets(api: ApiServer) -> None:
    api.auth.failures = RateLimiter(rate=1000, burst=1000)
    before = len(api.auth.limiter)
    with client_from(api, "127.0.0.5", None) as c:
        for _ in range(200):
            forged = f"mm_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
            r = c.get("/v1/me", headers={"Authorization": f"Bearer {forged}"})
            assert r.status_code == 401
    assert len(api.auth.limiter) == before


def test_rate_limiter_memory_is_bounded_and_idle_buckets_are_evicted() -> None:
    capped = RateLimiter(rate=1.0, burst=5, max_keys=100)
    for i in range(5000):
        capped.take(f"key-{i}")
        assert len(capped) <= 100
    # The most recent keys are the ones kept, with their charge.
    assert capped.retry_after("key-4999") == 0 and len(capped) == 100

    fast = RateLimiter(rate=1000.0, burst=2, max_keys=10_000)
    for i in range(1000):
        fast.take(f"idle-{i}")
    # A bucket idle for burst/rate (2 ms) is full again: the next take drops all of them.
    deadline = time.monotonic() + 5
    while True:
        fast.take("fresh")
        if len(fast) == 1 or time.monotonic() > deadline:
            break
    assert len(fast) == 1
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)
