"""Redaction policies: the actions, compiled per customer and version, the policies topic's
records, and the retroactive rewrite of stored rows. Shared by streams/ (which applies them)
and api/ (where operators read and change them)."""

from mailmeta.policy._forms import UnsearchableField, search_forms, stored_as, stored_forms
from mailmeta.policy._log import (
    POLICY_PARTITION,
    PolicyLog,
    PolicyRecord,
    TopicReader,
    TopicState,
    VersionTaken,
    check_document,
    config_record,
    decode_record,
    effective,
    report_invalid,
)
from mailmeta.policy._redact import (
    CompiledPolicy,
    PolicyConflict,
    PolicyRecordError,
    RedactionError,
    Redactor,
    hmac_hex,
    hmac_tagged,
    mask,
    truncate_ip,
)
from mailmeta.policy._retro import PREVIEW_NOTE, diff, plan, rewriter

__all__ = [
    "POLICY_PARTITION",
    "PREVIEW_NOTE",
    "CompiledPolicy",
    "PolicyConflict",
    "PolicyLog",
    "PolicyRecord",
    "PolicyRecordError",
    "RedactionError",
    "Redactor",
    "TopicReader",
    "TopicState",
    "UnsearchableField",
    "VersionTaken",
    "check_document",
    "config_record",
    "decode_record",
    "diff",
    "effective",
    "hmac_hex",
    "hmac_tagged",
    "mask",
    "plan",
    "report_invalid",
    "rewriter",
    "search_forms",
    "stored_as",
    "stored_forms",
    "truncate_ip",
]
