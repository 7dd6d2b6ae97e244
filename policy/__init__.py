"""Redaction policies: the actions, compiled per customer and version, the policies topic's
records, and the retroactive rewrite of stored rows. Shared by streams/ (which applies them)
and api/ (where operators read and change them)."""

from mailmeta.policy._applied import (
    MAX_REASON,
    STATUS_PARTITION,
    CustomerStatus,
    Refusal,
    StatusRecordError,
    WorkerStatus,
    applied_view,
    decode_status,
    read_statuses,
)
from mailmeta.policy._forms import UnsearchableField, search_forms, stored_as, stored_forms
from mailmeta.policy._log import (
    POLICY_PARTITION,
    PolicyLog,
    PolicyRecord,
    PolicyRecordError,
    config_record,
    decode_record,
    effective,
)
from mailmeta.policy._redact import (
    CompiledPolicy,
    RedactionError,
    Redactor,
    hmac_hex,
    hmac_tagged,
    mask,
    truncate_ip,
)
from mailmeta.policy._retro import PREVIEW_NOTE, diff, plan, rewriter

__all__ = [
    "MAX_REASON",
    "POLICY_PARTITION",
    "PREVIEW_NOTE",
    "STATUS_PARTITION",
    "CompiledPolicy",
    "CustomerStatus",
    "PolicyLog",
    "PolicyRecord",
    "PolicyRecordError",
    "RedactionError",
    "Redactor",
    "Refusal",
    "StatusRecordError",
    "UnsearchableField",
    "WorkerStatus",
    "applied_view",
    "config_record",
    "decode_record",
    "decode_status",
    "diff",
    "effective",
    "hmac_hex",
    "hmac_tagged",
    "mask",
    "plan",
    "read_statuses",
    "rewriter",
    "search_forms",
    "stored_as",
    "stored_forms",
    "truncate_ip",
]
