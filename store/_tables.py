"""The store's table names and the retention of its own tables: a leaf every module reads."""

from __future__ import annotations

TABLE = "messages"
AUDIT_TABLE = "audit_log"
RETENTION_TABLE = "retention_overrides"
HOURLY_TABLE = "messages_hourly"
HOURLY_VIEW = "messages_hourly_mv"
# Hourly counts hold no personal data: they outlive the rows they count (13 months, so a
# dashboard can compare a month with the same month last year), then expire by their TTL.
HOURLY_RETENTION_DAYS = 400
# Since migration 6: one row per event (its hour, status, size), so copies of an event
# (redelivery, a sink restart mid-batch, a retroactive rewrite) collapse instead of adding
# up. The event id is a random UUID minted at ingest: it names no person. The summing
# table above stays only for hours whose rows had expired before migration 6.
HOURLY_EVENTS_TABLE = "hourly_events"
HOURLY_EVENTS_VIEW = "hourly_events_mv"  # until migration 9; the store writes it since
HOURLY_PROJECTION = "per_hour"  # its per-hour sums (migration 9): the stats read these
# What was erased (customer, time, the stored forms matched), kept while a topic may still
# hold the erased events (the redacted topic keeps at most 7 days): every insert drops the
# events it names, so a replay cannot bring them back.
ERASURE_LOG_TABLE = "erasure_log"
ERASURE_LOG_DAYS = 8
TOKENS_TABLE = "api_tokens"
ACCESS_LOG_TABLE = "api_access_log"
ACCESS_LOG_RETENTION_DAYS = 30
POLICY_VERSIONS_TABLE = "policy_versions"
LEDGER_TABLE = "schema_migrations"
# The webhook stage (store/_webhooks.py): endpoints, and the durable delivery queue.
WEBHOOK_ENDPOINTS_TABLE = "webhook_endpoints"
WEBHOOK_OUTBOX_TABLE = "webhook_outbox"
