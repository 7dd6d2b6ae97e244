"""aiosmtpd's SMTP protocol, hardened and with its per-connection overheads removed.

aiosmtpd stays the protocol engine (its command loop, DATA reader, STARTTLS and the CVE
fixes in them are used as they are); this subclass changes only what is costly or missing:

- ``__init__``: aiosmtpd introspects the handler and itself (``inspect.getmembers``,
  ``dir``) and formats a log line on *every* connection, ~25 % of a one-message session.
  What it derives is the same for every connection of a server, so :class:`Shared`
  computes it once.
- ``_getaddr``: the common ``<local@domain>`` form is matched by one regex; anything else
  (quoted local parts, source routes, address literals, ``<>``) still goes to aiosmtpd's
  RFC 5322 parser, so results are the same (a test compares them).
- limits: connections per client IP (421 at the greeting), a reply budget for errors
  (421 and close after ``max_errors`` 5xx replies), an idle timeout that says 421 first.
- AUTH PLAIN/LOGIN verify the password off the event loop (argon2 is slow by design).
- DSN (RFC 3461) when the handler offers it: aiosmtpd answers 555 to any MAIL/RCPT parameter
  it does not know and upper-cases the rest, so RET/ENVID and NOTIFY/ORCPT are taken out of
  the command here (as sent), before aiosmtpd sees it, and handed to the handler's hook.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
import secrets
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiosmtpd.smtp
from aiosmtpd.proxy_protocol import V2_CMD, ProxyData
from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
    Envelope,
    _AuthMechAttr,
    login_always_fail,
    syntax,
)

from mailmeta.ingest import _metrics as metrics
from mailmeta.ingest._auth import Authenticator, IPNetwork, in_networks
from mailmeta.ingest._dsn_params import (
    MAIL_EXTRA,
    MAIL_PARAMS,
    RCPT_EXTRA,
    RCPT_PARAMS,
    DsnParamError,
    MailDsn,
    RcptDsn,
    mail_dsn,
    rcpt_dsn,
    take_params,
)
from mailmeta.ingest._extract import peer_ip
from mailmeta.ingest._tls import tls_info

_sanitized_log = aiosmtpd.smtp.sanitized_log


def _lazy_sanitized_log(func: Callable[..., None], msg: Any, *args: Any, **kwargs: Any) -> None:
    # aiosmtpd sanitizes (copies) every command line for two log calls per command before
    # the logger decides to drop them; ask the logger first.
    logger = getattr(func, "__self__", None)
    if isinstance(logger, logging.Logger):
        level = logging.DEBUG if func.__name__ == "debug" else logging.INFO
        if not logger.isEnabledFor(level):
            return
    _sanitized_log(func, msg, *args, **kwargs)


aiosmtpd.smtp.sanitized_log = _lazy_sanitized_log

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_FAST_ADDR = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*)>(?:[ \t]+(.*))?\Z")

# Controls in a command line (TAB still separates words) or anywhere in an address: a next
# hop that ends lines at a bare CR would read what follows one as a command of ours.
_LINE_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ADDR_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

REPLY_CONTROL_IN_COMMAND = "501 5.5.2 Syntax error: control character in command"
REPLY_CONTROL_IN_ADDRESS = "553 5.1.3 Error: control character in address"
REPLY_TLS_ACTIVE = "503 5.5.1 Error: TLS already active"
REPLY_AUTH_LIMITED = "454 4.7.0 Too many failed authentications, try again later"
PROXY_TIMEOUT = 10.0  # for a load balancer's PROXY header
REPLY_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address, try again later"
REPLY_TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"


class _Peer(tuple[Any, ...]):
    """aiosmtpd's ``session.peer`` (host, port), shown as the connection id: aiosmtpd logs
    the peer with ``%r``, and logs carry no client address (personal data)."""

    conn_id = ""

    def __repr__(self) -> str:
        return f"conn {self.conn_id}"

    __str__ = __repr__


class MailEnvelope(Envelope):
    """aiosmtpd's envelope plus what RCPT decided: each recipient's customer, the next hop;
    and the DSN parameters of MAIL and of each recipient."""

    def __init__(self) -> None:
        super().__init__()
        self.customer_of: dict[str, str] = {}
        self.next_hop: str | None = None
        self.dsn: MailDsn | None = None
        self.rcpt_dsn: dict[str, RcptDsn] = {}


@dataclass
class Shared:
    """Everything the protocol objects of one server have in common (built once)."""

    handler: Any
    hostname: str
    ident: str
    data_size_limit: int
    timeout: float
    max_errors: int
    max_per_ip: int
    tls_context: Any = None
    authenticator: Authenticator | None = None
    proxy_networks: list[IPNetwork] = field(default_factory=list)
    connections: set[FrontEndSMTP] = field(default_factory=set)
    per_ip: collections.Counter[str] = field(default_factory=collections.Counter)
    handle_hooks: dict[str, Any] = field(init=False)
    ehlo_hook_ver: str | None = field(init=False)
    smtp_methods: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        h = self.handler
        self.handle_hooks = {
            m.removeprefix("handle_"): getattr(h, m) for m in dir(h) if m.startswith("handle_")
        }
        self.handle_hooks["PROXY"] = _handle_proxy
        # Our handler's handle_EHLO takes the 5-argument (new) form.
        self.ehlo_hook_ver = "new" if "EHLO" in self.handle_hooks else None
        self.smtp_methods = {
            m.removeprefix("smtp_"): m for m in dir(FrontEndSMTP) if m.startswith("smtp_")
        }


async def _handle_proxy(server: SMTP, session: Any, envelope: Any, data: ProxyData) -> bool:
    assert isinstance(server, FrontEndSMTP)
    return await server.proxied(data)


class _BoundMethods:
    """aiosmtpd's ``_smtp_methods`` dict, binding a method only when a command uses it."""

    __slots__ = ("_names", "_proto")

    def __init__(self, proto: SMTP, names: dict[str, str]) -> None:
        self._proto, self._names = proto, names

    def get(self, command: str, default: Any = None) -> Any:
        attr = self._names.get(command)
        if attr is None:
            return default
        method = getattr(self._proto, attr)
        proto = self._proto
        assert isinstance(proto, FrontEndSMTP)
        return lambda arg: proto._guarded(command, method, arg)

    def items(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self._proto, attr)) for name, attr in self._names.items()]


class FrontEndSMTP(SMTP):
    def __init__(self, shared: Shared, loop: asyncio.AbstractEventLoop) -> None:
        # Mirrors aiosmtpd 1.4.6 SMTP.__init__ (pinned in pyproject) with the per-server
        # parts taken from ``shared``; options we never use are set to their off values.
        self._shared = shared
        self.__ident__ = shared.ident
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.event_handler = shared.handler
        self.data_size_limit = shared.data_size_limit
        self.enable_SMTPUTF8 = False
        self._decode_data = False
        # Per connection: aiosmtpd keeps this dict on the class, so EHLO on one connection
        # (MAIL limit += 26 for SIZE) changes every other connection's limits.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.hostname = shared.hostname
        self.tls_context = shared.tls_context
        self.require_starttls = False  # per customer, at RCPT (the handler)
        self._timeout_duration = shared.timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True  # AUTH only over TLS: never a clear-text password
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._auth_methods = (
            {
                "LOGIN": _AuthMechAttr(self.auth_LOGIN, True),
                "PLAIN": _AuthMechAttr(self.auth_PLAIN, True),
            }
            if shared.authenticator
            else {}
        )
        self._handle_hooks = shared.handle_hooks
        self._ehlo_hook_ver = shared.ehlo_hook_ver
        self._smtp_methods = _BoundMethods(self, shared.smtp_methods)  # type: ignore[assignment]
        self._enforce_call_limit = False
        self._errors = 0
        self._peer_ip: str | None = None
        self.client_ip: str | None = None  # normalised (IPv4-mapped shown as IPv4)
        self._refused = False
        self._deadline = 0.0
        self.conn_id = secrets.token_hex(4)  # names the connection in logs
        self._dsn = False  # DSN offered in this session's EHLO
        # The DSN parameters of the MAIL/RCPT being handled: for the handler's hook.
        self.dsn_params: MailDsn | RcptDsn | DsnParamError | None = None

    def _create_envelope(self) -> MailEnvelope:
        return MailEnvelope()

    # -- connection lifecycle --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self._original_transport is not None
        super().connection_made(transport)
        if self.session is not None and isinstance(self.session.peer, tuple):
            self.session.peer = peer = _Peer(self.session.peer)
            peer.conn_id = self.conn_id
        if starttls:
            version, cipher = tls_info(self.session.ssl if self.session else None)
            metrics.TLS_SESSIONS.labels(version or "unknown", cipher or "unknown").inc()
            return
        shared = self._shared
        shared.connections.add(self)
        metrics.ACTIVE_CONNECTIONS.inc()
        ip = peer_ip(self.session.peer if self.session else None)
        if shared.proxy_networks and in_networks(ip, shared.proxy_networks):
            # A load balancer: the client is the one its PROXY header names (handle_PROXY).
            # Until that header is in, the connection counts against the balancer's own
            # address, so connections that never send one cannot pile up unbounded.
            self._proxy_timeout = PROXY_TIMEOUT
            self._count(ip)
            if self._refused:
                metrics.CONNECTIONS.labels("refused_per_ip").inc()
        else:
            self._admit(ip)

    def _count(self, ip: str | None) -> None:
        """This connection counts against ``ip``'s connection limit (and no other)."""
        shared = self._shared
        self._uncount()
        if ip is not None:
            self._peer_ip = ip
            shared.per_ip[ip] += 1
            self._refused = shared.per_ip[ip] > shared.max_per_ip

    def _uncount(self) -> None:
        ip, self._peer_ip = self._peer_ip, None
        if ip is not None:
            per_ip = self._shared.per_ip
            per_ip[ip] -= 1
            if per_ip[ip] <= 0:
                del per_ip[ip]

    def _admit(self, ip: str | None) -> None:
        """The client is ``ip``: it counts against that address's connection limit."""
        self.client_ip = ip
        self._count(ip)
        metrics.CONNECTIONS.labels("refused_per_ip" if self._refused else "accepted").inc()

    async def proxied(self, data: ProxyData) -> bool:
        """aiosmtpd's handle_PROXY hook: admit the client the load balancer names (LOCAL,
        a health check of the balancer itself: the balancer). False closes the connection."""
        if not data.valid:
            return False
        src = data.src_addr
        if src is None or data.command == V2_CMD.LOCAL:
            self._admit(peer_ip(self.session.peer if self.session else None))
        elif isinstance(src, ipaddress.IPv4Address | ipaddress.IPv6Address):
            self._admit(peer_ip((str(src), data.src_port)))
        else:
            return False  # a Unix socket path: no client address
        if self._refused:
            await self.push(REPLY_TOO_MANY_CONNECTIONS)
            return False
        return True

    async def smtp_PROXY(self, arg: str | None) -> None:
        # A PROXY header from an address not in the proxy networks: a client trying to
        # pass for another. Nothing more is read from it.
        metrics.CONNECTIONS.labels("proxy_refused").inc()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        shared = self._shared
        if self in shared.connections:
            shared.connections.discard(self)
            metrics.ACTIVE_CONNECTIONS.dec()
            self._uncount()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self._refused:
            # Before the greeting, like Postfix's anvil limits: the client retries later.
            await self.push(REPLY_TOO_MANY_CONNECTIONS)
            if self.transport is not None:
                self.transport.close()
            return
        try:
            await super()._handle_client()
        except asyncio.IncompleteReadError:
            # Only the PROXY header is read outside aiosmtpd's command loop: cut short.
            if self.transport is not None:
                self.transport.close()

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels and re-creates a timer on every command; moving a deadline and
        # re-arming only when the timer fires early does the same with one timer per
        # connection (most sessions are over before it fires). A deadline earlier than the
        # live timer (the PROXY header's 10 s after the connection's first 300 s) re-arms it.
        duration = duration or self._timeout_duration
        self._deadline = self.loop.time() + duration
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled() and handle.when() > self._deadline:
            handle.cancel()
        if handle is None or handle.cancelled():
            self._timeout_handle = self.loop.call_later(duration, self._timeout_cb)

    def _timeout_cb(self) -> None:
        left = self._deadline - self.loop.time()
        if left > 0:
            self._timeout_handle = self.loop.call_later(left, self._timeout_cb)
            return
        # aiosmtpd closes silently; RFC 5321 4.2.2 wants a 421 so the client knows why.
        metrics.CONNECTIONS.labels("timeout").inc()
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
            self.transport.close()

    @property
    def in_transaction(self) -> bool:
        # MAIL accepted and DATA not yet answered (aiosmtpd resets the envelope only after
        # the DATA handler returned and writes the reply without yielding in between).
        return self.envelope is not None and self.envelope.mail_from is not None

    # -- replies ---------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        # aiosmtpd's push plus the error budget (Postfix's smtpd_hard_error_limit): a client
        # that keeps earning 5xx replies (bad commands, refused recipients, failed AUTH)
        # is disconnected.
        response = status.encode("ascii", "replace") if isinstance(status, str) else status
        self._writer.write(response + b"\r\n")
        if response[:1] == b"5":
            self._errors += 1
            if self._errors >= self._shared.max_errors:
                metrics.CONNECTIONS.labels("too_many_errors").inc()
                self._writer.write(REPLY_TOO_MANY_ERRORS.encode() + b"\r\n")
                if self.transport is not None:
                    self.transport.close()
                return
        await self._writer.drain()

    # -- parsing ---------------------------------------------------------------------------

    async def _guarded(self, command: str, method: Any, arg: str | None) -> None:
        """Run a command whose line holds no control character; else 553 when one is in
        the address of MAIL/RCPT, 501 otherwise."""
        if arg is None or not _LINE_CONTROL.search(arg):
            await method(arg)
        elif command in ("MAIL", "RCPT") and self._bad_address(arg):
            await self.push(REPLY_CONTROL_IN_ADDRESS)
        else:
            await self.push(REPLY_CONTROL_IN_COMMAND)

    def _bad_address(self, arg: str) -> bool:
        _, _, rest = arg.partition(":")
        return self._getaddr(rest.strip())[0] is None

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        m = _FAST_ADDR.match(arg)
        if m is not None:
            return m.group(1), m.group(2) or ""
        address, rest = super()._getaddr(arg)
        if address is not None and _ADDR_CONTROL.search(address):
            return None, None
        return address, rest

    # -- DSN (RFC 3461) --------------------------------------------------------------------

    def offer_dsn(self) -> None:
        """The handler advertises DSN in this EHLO: accept its parameters, and the longer
        command lines they make (set, not added: aiosmtpd adds SIZE's 26 on every EHLO)."""
        self._dsn = True
        self.command_size_limits["MAIL"] = SMTP.command_size_limit + 26 + MAIL_EXTRA
        self.command_size_limits["RCPT"] = SMTP.command_size_limit + RCPT_EXTRA

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        await super().smtp_MAIL(self._take_dsn(arg, "FROM:", MAIL_PARAMS))

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        await super().smtp_RCPT(self._take_dsn(arg, "TO:", RCPT_PARAMS))

    def _take_dsn(self, arg: str | None, keyword: str, names: tuple[str, ...]) -> str | None:
        """``arg`` without its DSN parameters, which go to :attr:`dsn_params` (checked, or
        the error to reply with). Anything unusable is left to aiosmtpd's own replies."""
        self.dsn_params = None
        if not self._dsn or arg is None or arg.endswith(">") or self.session is None:
            return arg
        if not self.session.extended_smtp:  # HELO after EHLO: no parameters at all
            return arg
        path = self._strip_command_keyword(keyword, arg)
        if path is None:
            return arg
        address, rest = self._getaddr(path)
        if address is None or not rest or not arg.endswith(rest):
            return arg
        try:
            kept, found = take_params(rest, names)
            if not found:
                return arg
            self.dsn_params = mail_dsn(found) if keyword == "FROM:" else rcpt_dsn(found)
        except DsnParamError as exc:
            self.dsn_params = exc
            kept = [t for t in rest.split() if t.partition("=")[0].upper() not in names]
        head = arg[: len(arg) - len(rest)].rstrip()
        return " ".join([head, *kept])

    # -- STARTTLS --------------------------------------------------------------------------

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        # RFC 3207 4.2: no STARTTLS inside TLS. aiosmtpd would start a second handshake,
        # and every byte that follows would log an asyncio traceback at ERROR.
        if self._tls_protocol is not None:
            await self.push(REPLY_TLS_ACTIVE)
            return
        await super().smtp_STARTTLS(arg)

    # -- AUTH ------------------------------------------------------------------------------

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._verify(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if not isinstance(login, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._verify(login, password)

    async def _verify(self, login: bytes, password: bytes) -> AuthResult:
        authenticator = self._shared.authenticator
        if authenticator is None:
            return AuthResult(success=False, handled=False)
        if authenticator.failures.blocked(self.client_ip):
            # Before argon2 runs: a guesser costs us nothing more, right password or not.
            metrics.AUTH.labels("limited").inc()
            return AuthResult(success=False, handled=False, message=REPLY_AUTH_LIMITED)
        user = await authenticator.verify(login, password)
        metrics.AUTH.labels("success" if user else "failure").inc()
        if user is None:
            authenticator.failures.failed(self.client_ip)
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=user)
