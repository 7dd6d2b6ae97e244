"""Stage 2: apply each customer's redaction policy, raw topic -> redacted topic (faust)."""

from mailmeta.streams._redact import (
    CompiledPolicy,
    RedactionError,
    Redactor,
    hmac_hex,
    mask,
    truncate_ip,
)

__all__ = ["CompiledPolicy", "RedactionError", "Redactor", "hmac_hex", "mask", "truncate_ip"]
