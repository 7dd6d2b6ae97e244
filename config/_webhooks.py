"""Where webhooks may go: the SSRF guard shared by the API (an endpoint's URL when it is set)
and the webhook stage (every connection: a name is resolved, each address checked, and the
connection made to that checked address, so a DNS answer that changes in between cannot
point a request at an internal service)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from mailmeta.config._models import IPNetwork, parse_networks

# Cloud metadata services not already inside a refused range (169.254.169.254 is link-local).
_METADATA = (ipaddress.ip_network("fd00:ec2::254/128"), ipaddress.ip_network("100.100.100.200/32"))
ALLOW_SETTING = "MAILMETA_WEBHOOK_ALLOW_NETWORKS"


class Refused(ValueError):
    """The URL or one of its addresses may not receive webhooks (the text says why)."""


@dataclass(frozen=True)
class NetworkGuard:
    """``allow``: networks an operator opened (``MAILMETA_WEBHOOK_ALLOW_NETWORKS``) even though
    they are loopback, private, link-local or otherwise not globally routable."""

    allow: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str) -> NetworkGuard:
        return cls(tuple(parse_networks(text, ALLOW_SETTING)))

    def refusal(self, address: str) -> str | None:
        """Why ``address`` may not be connected to, or None when it may."""
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allow):
            return None
        if any(ip in net for net in _METADATA) or not ip.is_global or ip.is_multicast:
            return (
                f"{ip} is not a public address (loopback, private, link-local or metadata); "
                f"an operator may allow its network with {ALLOW_SETTING}"
            )
        return None

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of ``host``, every one allowed (else Refused): connect to these."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise Refused(f"cannot resolve {host!r}: {exc}") from None
        return self._checked(host, [str(i[4][0]) for i in infos])

    def check_url(self, url: str) -> None:
        """Refused unless ``url`` is http(s) with a host whose every address is allowed
        (blocking: for the API's handlers, which run in a thread pool)."""
        host, port = split_url(url)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise Refused(f"cannot resolve {host!r}: {exc}") from None
        self._checked(host, [str(i[4][0]) for i in infos])

    def _checked(self, host: str, found: list[str]) -> list[str]:
        addresses = list(dict.fromkeys(found))
        if not addresses:
            raise Refused(f"{host!r} has no address")
        for address in addresses:
            # One refused address refuses the name: a client may pick any of them.
            why = self.refusal(address)
            if why is not None:
                raise Refused(f"{host!r} resolves to {why}")
        return addresses


def split_url(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL without credentials; Refused otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise Refused("the URL must be http:// or https://")
    if not parts.hostname:
        raise Refused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise Refused("the URL may not hold credentials")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)
