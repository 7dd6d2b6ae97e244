"""The DSN extension's envelope parameters (RFC 3461): ``RET``/``ENVID`` on MAIL,
``NOTIFY``/``ORCPT`` on RCPT. Checked here, kept with the envelope and passed on to a next
hop that offers DSN itself.

Their values can hold addresses (ORCPT always does): replies name the parameter, never its
value, and nothing here logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAIL_PARAMS = ("RET", "ENVID")
RCPT_PARAMS = ("NOTIFY", "ORCPT")

# RFC 3461 4.4 and 4.2.
ENVID_MAX = 100
ORCPT_MAX = 500
# RFC 3461 3: what MAIL and RCPT command lines may grow by when DSN is offered.
MAIL_EXTRA = 110
RCPT_EXTRA = 500

# xtext (RFC 3461 4): printable ASCII but "+" and "=", or "+" and two upper-case hex digits.
_XTEXT = r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+"
_ENVID = re.compile(_XTEXT)
# addr-type is an atom (RFC 5322 atext).
_ORCPT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+;" + _XTEXT)
_NOTIFY_ORDER = ("SUCCESS", "FAILURE", "DELAY")

_REPLY = {
    "RET": "501 5.5.4 Invalid RET parameter (FULL or HDRS)",
    "ENVID": f"501 5.5.4 Invalid ENVID parameter (xtext, at most {ENVID_MAX} characters)",
    "NOTIFY": "501 5.5.4 Invalid NOTIFY parameter (NEVER, or SUCCESS, FAILURE, DELAY)",
    "ORCPT": f"501 5.5.4 Invalid ORCPT parameter (type;xtext, at most {ORCPT_MAX} characters)",
}


class DsnParamError(ValueError):
    """A malformed DSN parameter; ``reply`` is the 501 for the client (no value in it)."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class MailDsn:
    ret: str | None = None  # FULL | HDRS
    envid: str | None = None  # xtext, as the client sent it

    def params(self) -> str:
        """The parameters for a MAIL command to a next hop, each after a space."""
        out = f" RET={self.ret}" if self.ret else ""
        return out + (f" ENVID={self.envid}" if self.envid else "")


@dataclass(frozen=True, slots=True)
class RcptDsn:
    notify: str | None = None  # NEVER, or SUCCESS/FAILURE/DELAY joined by commas
    orcpt: str | None = None  # addr-type;xtext, as the client sent it

    def params(self) -> str:
        out = f" NOTIFY={self.notify}" if self.notify else ""
        return out + (f" ORCPT={self.orcpt}" if self.orcpt else "")


def take_params(rest: str, names: tuple[str, ...]) -> tuple[list[str], dict[str, str | None]]:
    """Split a MAIL/RCPT parameter string into the other parameters (as sent) and the
    ``names`` ones (keyword upper-cased -> value, None without "="); a repeated one is a
    :class:`DsnParamError`."""
    kept: list[str] = []
    found: dict[str, str | None] = {}
    for token in rest.split():
        key, eq, value = token.partition("=")
        key = key.upper()
        if key not in names:
            kept.append(token)
        elif key in found:
            raise DsnParamError(f"501 5.5.4 Duplicate {key} parameter")
        else:
            found[key] = value if eq else None
    return kept, found


def mail_dsn(found: dict[str, str | None]) -> MailDsn | None:
    if not found:
        return None
    ret = found.get("RET")
    if "RET" in found:
        ret = (ret or "").upper()
        if ret not in ("FULL", "HDRS"):
            raise DsnParamError(_REPLY["RET"])
    envid = found.get("ENVID")
    if "ENVID" in found and not _xtext(envid, _ENVID, ENVID_MAX):
        raise DsnParamError(_REPLY["ENVID"])
    return MailDsn(ret, envid)


def rcpt_dsn(found: dict[str, str | None]) -> RcptDsn | None:
    if not found:
        return None
    notify = _notify(found["NOTIFY"]) if "NOTIFY" in found else None
    orcpt = found.get("ORCPT")
    if "ORCPT" in found and not _xtext(orcpt, _ORCPT, ORCPT_MAX):
        raise DsnParamError(_REPLY["ORCPT"])
    return RcptDsn(notify, orcpt)


def _xtext(value: str | None, pattern: re.Pattern[str], limit: int) -> bool:
    return value is not None and len(value) <= limit and pattern.fullmatch(value) is not None


def _notify(value: str | None) -> str:
    """NEVER alone, or a set of SUCCESS/FAILURE/DELAY (any case, repeats allowed), in one
    canonical order."""
    items = [v.upper() for v in (value or "").split(",")]
    if items == ["NEVER"]:
        return "NEVER"
    if not items or any(v not in _NOTIFY_ORDER for v in items):
        raise DsnParamError(_REPLY["NOTIFY"])
    return ",".join(v for v in _NOTIFY_ORDER if v in items)
