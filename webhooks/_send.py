"""One signed POST to one endpoint, guarded against SSRF.

The host is resolved and every address checked (config.NetworkGuard) right before the
request, and the connection goes to that checked address (Host header and TLS SNI keep the
name), so a DNS answer that changes between the check and the connect cannot redirect it.
Redirects are never followed; the answer is read to at most a bound and then dropped.
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from standardwebhooks.webhooks import Webhook

from mailmeta.config import NetworkGuard, Refused, split_url


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    status: int = 0  # 0: no HTTP answer
    error: str = ""
    retry_after: float | None = None
    latency_s: float = 0.0


def webhook_id(endpoint_id: str, event_ids: list[str], replay_id: str) -> str:
    """The batch's id: the same for every attempt of the same events (receivers dedupe by it)."""
    h = hashlib.sha256("\n".join([endpoint_id, replay_id, *event_ids]).encode()).hexdigest()
    return f"msg_{h[:32]}"


def signature(secrets: list[str], msg_id: str, at: datetime, body: bytes) -> str:
    """Standard Webhooks ``webhook-signature``: one ``v1,…`` per secret, space-separated."""
    return " ".join(Webhook(s).sign(msg_id, at, body) for s in secrets)


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class Sender:
    def __init__(self, guard: NetworkGuard, timeout_s: float, max_response_bytes: int) -> None:
        self._guard = guard
        self._max = max_response_bytes
        # trust_env=False: a proxy from the environment would connect where we did not check.
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        t0 = time.monotonic()
        try:
            host, port = split_url(url)
            address = (await self._guard.resolve(host, port))[0]
        except Refused as exc:
            return Outcome(False, error=f"refused: {exc}", latency_s=time.monotonic() - t0)
        parsed = httpx.URL(url)
        ip = ipaddress.ip_address(address)
        target = parsed.copy_with(host=str(ip))
        extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
        send_headers = {
            **headers,
            "host": parsed.netloc.decode("ascii"),
            "content-type": "application/json",
            "user-agent": "mailmeta-webhooks/1",
        }
        try:
            async with self._client.stream(
                "POST", target, content=body, headers=send_headers, extensions=extensions
            ) as resp:
                read = 0
                async for chunk in resp.aiter_raw():
                    read += len(chunk)
                    if read > self._max:
                        break  # the body is never used: only a bound on what we accept
                status = resp.status_code
                wait = retry_after(resp.headers.get("retry-after"))
        except httpx.HTTPError as exc:
            return Outcome(
                False, error=f"{type(exc).__name__}: {exc}"[:300], latency_s=time.monotonic() - t0
            )
        ok = 200 <= status < 300
        error = (
            ""
            if ok
            else f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
        )
        return Outcome(ok, status, error, wait, time.monotonic() - t0)
