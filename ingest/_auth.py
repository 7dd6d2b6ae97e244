"""Who may relay: SMTP AUTH users (argon2-hashed passwords from the customers file) and
client networks. Inbound mail to a customer's own domain needs neither."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from mailmeta.config import Customer, Customers, IPNetwork, parse_networks

_HASHER = PasswordHasher()


def hash_password(password: str) -> str:
    """The value to put in a customer's ``smtp_users[].password_hash``."""
    return _HASHER.hash(password)


@dataclass(frozen=True, slots=True)
class AuthUser:
    login: str
    customer_id: str


class FailureLimit:
    """Failed logins per client address: a token bucket of ``burst`` failures refilled at
    ``rate`` per second. A refilled bucket is dropped, and at most ``max_clients`` are
    kept (the least recently failed go first), so memory stays bounded."""

    def __init__(self, burst: int = 5, rate: float = 1 / 12, max_clients: int = 10_000) -> None:
        self.burst, self.rate, self.max_clients = burst, rate, max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def _tokens(self, key: str, now: float) -> float:
        tokens, then = self._buckets.get(key, (self.burst, now))
        return min(float(self.burst), tokens + (now - then) * self.rate)

    def blocked(self, ip: str | None) -> bool:
        key, now = _client_key(ip), time.monotonic()
        tokens = self._tokens(key, now)
        if tokens >= self.burst:
            self._buckets.pop(key, None)
        return tokens < 1

    def failed(self, ip: str | None) -> None:
        key, now = _client_key(ip), time.monotonic()
        tokens = self._tokens(key, now) - 1
        self._buckets.pop(key, None)  # re-inserted last: the dict is in order of failure
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            del self._buckets[next(iter(self._buckets))]


def _client_key(ip: str | None) -> str:
    # An IPv6 client usually holds a whole /64: one bucket for it.
    addr = _ip(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return ip or ""


class Authenticator:
    """Checks AUTH PLAIN/LOGIN credentials against the customers' smtp_users."""

    def __init__(self, customers: Customers, *, max_concurrent: int = 2) -> None:
        self._slots = asyncio.Semaphore(max_concurrent)
        self.failures = FailureLimit()
        # This region's users only: another region's user fails like an unknown one (same
        # reply, same argon2 cost), so guesses cannot be spread over the regions' limits.
        self._users: dict[str, tuple[str, str]] = {
            u.username: (c.id, u.password_hash) for c in customers.here() for u in c.smtp_users
        }
        # Unknown users are checked against a real hash too: the reply takes as long as
        # for a known user with a wrong password, so logins cannot be probed by timing.
        self._dummy = _HASHER.hash("mailmeta-no-such-user")
        self.running = 0  # argon2 verifications in progress, and the most there ever were
        self.peak = 0

    def __bool__(self) -> bool:
        return bool(self._users)

    def _verify_sync(self, login: str, password: str) -> AuthUser | None:
        customer_id, hashed = self._users.get(login, ("", self._dummy))
        try:
            _HASHER.verify(hashed, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return AuthUser(login, customer_id) if customer_id else None

    async def verify(self, login: bytes, password: bytes) -> AuthUser | None:
        try:
            user, pw = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return None
        # argon2 costs tens of ms of CPU and 64 MiB by design: off the event loop, and only
        # a few at once, whatever the number of clients trying.
        async with self._slots:
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                return await asyncio.to_thread(self._verify_sync, user, pw)
            finally:
                self.running -= 1


class RelayAccess:
    """Maps a client address to who it may relay for."""

    def __init__(self, customers: Customers, relay_networks: str) -> None:
        self._customer_nets: list[tuple[IPNetwork, Customer]] = sorted(
            ((ipaddress.ip_network(n), c) for c in customers for n in c.client_networks),
            key=lambda item: -item[0].prefixlen,  # the most specific network wins
        )
        self._global = parse_networks(relay_networks, "MAILMETA_RELAY_NETWORKS")

    def network_customer(self, ip: str | None) -> Customer | None:
        addr = _ip(ip)
        if addr is None:
            return None
        for net, customer in self._customer_nets:
            if addr.version == net.version and addr in net:
                return customer
        return None

    def in_relay_networks(self, ip: str | None) -> bool:
        return in_networks(ip, self._global)


def in_networks(ip: str | None, nets: list[IPNetwork]) -> bool:
    addr = _ip(ip)
    return addr is not None and any(addr.version == n.version and addr in n for n in nets)


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
