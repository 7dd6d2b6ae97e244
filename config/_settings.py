"""Process settings, shared by every stage through MAILMETA_* environment variables."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, StringConstraints, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mailmeta import schema
from mailmeta.config._models import DEFAULT_REGION, REGION_RE, parse_networks

# The settings that name a topic (a region's topics carry its name as a suffix).
TOPIC_SETTINGS = (
    "raw_topic",
    "redacted_topic",
    "deadletter_topic",
    "policies_topic",
    "policy_status_topic",
)

DEFAULT_CONFIG = Path(__file__).with_name("customers.example.yaml")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAILMETA_", extra="ignore")

    config: Path = DEFAULT_CONFIG
    # The region this process serves (config `regions`): its customers only, through its own
    # topics ("mailmeta.raw.eu", ...), consumer groups and store. Topics not set explicitly
    # get the region as a suffix; the default region keeps the plain names.
    region: Annotated[str, StringConstraints(pattern=REGION_RE)] = DEFAULT_REGION
    data_dir: Path = Path(".mailmeta")
    kafka_bootstrap: str = "127.0.0.1:9092"
    # --- Kafka security (kafka/_clients.py): every client of every stage uses these ---------
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    # The password from the environment, or (preferred) from a file, e.g. a mounted secret.
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_ca_file: Path | None = None
    kafka_ssl_cert_file: Path | None = None
    kafka_ssl_key_file: Path | None = None
    # Topics mailmeta creates: replication factor min(3, brokers) and min.insync.replicas 2
    # from 3 brokers on (0 = derive from the cluster). A cluster of one is refused outside
    # local mode unless kafka_single_node says it is meant to be one.
    kafka_replication_factor: int = Field(default=0, ge=0)
    kafka_min_insync_replicas: int = Field(default=0, ge=0)
    kafka_single_node: bool = False
    raw_topic: str = schema.RAW_TOPIC
    redacted_topic: str = schema.REDACTED_TOPIC
    deadletter_topic: str = schema.DEADLETTER_TOPIC
    # Redaction policies: compacted, one partition, read whole by every redaction worker.
    policies_topic: str = "mailmeta.policies"
    # The redaction worker's own files (faust's datadir); default: data_dir/streams.
    streams_data_dir: Path | None = None
    # What each redaction worker applies (policy/_applied.py): one record per worker, sent on
    # every change and every policy_status_every_s; the API counts a worker heard within
    # policy_status_stale_s as live.
    policy_status_topic: str = "mailmeta.policy-status"
    policy_status_every_s: float = Field(default=5.0, gt=0, le=300)
    policy_status_stale_s: float = Field(default=15.0, gt=0, le=3600)
    # Prometheus metrics of a redaction worker (0 = off).
    streams_metrics_port: int = Field(default=0, ge=0, le=65535)
    # Prometheus metrics of the sink (0 = off), on api_host: lag, insert latency, errors.
    sink_metrics_port: int = Field(default=0, ge=0, le=65535)
    # The longest a redacted event waits in the sink for company before its batch is
    # inserted: lower trades more, smaller inserts for latency (bench/e2e_latency.py).
    sink_max_wait_ms: int = Field(default=500, ge=1, le=60_000)
    partitions: int = Field(default=3, ge=1)
    # Unredacted metadata must not outlive what customers were promised: keep it hours.
    raw_retention_hours: int = Field(default=6, ge=1)
    # "chdb:///abs/dir" (embedded) or "http(s)://user:pass@host:8123/db" (server).
    clickhouse_dsn: str = ""
    # A ClickHouse cluster (remote_servers name): replicated local tables ON CLUSTER behind
    # Distributed ones (store/_layout.py). Empty: one server, plain tables.
    clickhouse_cluster: str = ""
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 2525
    api_host: str = "127.0.0.1"
    api_port: int = 8025
    # Kafka's default. Local mode (`mailmeta up`, tests) sets 6000: a group join waits about
    # half of it on some brokers, and a local restart should not take 45 s to rebalance.
    session_timeout_ms: int = Field(default=45000, ge=1000)
    log_level: str = "info"

    # --- query API access (api/_token_authority.py) ----------------------------------------
    # Bearer tokens required on the API (`mailmeta up` and any deployment: keep it on).
    api_auth: bool = True
    # When set (and api_auth is on), the sink creates an operator token on start unless the
    # file already holds a working one, and writes it here with mode 0600.
    operator_token_file: Path | None = None
    # Per-token request budget: a token bucket of `burst` requests refilled at `rate`/s.
    api_rate_per_s: float = Field(default=20.0, gt=0)
    api_rate_burst: int = Field(default=60, ge=1)
    # Comma-separated CIDRs of reverse proxies whose X-Forwarded-For/-Proto the API believes
    # (the client address the failed-login limit counts). Empty: none, not even loopback, so
    # a client cannot pick a fresh address per guess.
    api_trusted_proxies: str = ""
    # Exports stream whole tables: at most this many at once per customer and in all, beyond
    # which the API answers 429 with Retry-After (each export holds a page of rows in memory).
    api_export_max_per_customer: int = Field(default=2, ge=1)
    api_export_max_total: int = Field(default=4, ge=1)

    # --- SMTP front end (ingest) -----------------------------------------------------------
    # Next hop "HOST:PORT" for relay mode; empty: terminal sink (events say "accepted").
    relay_to: str = ""
    # STARTTLS to the next hop whenever it offers it (required for customers with
    # require_tls). Verification off by default, as in MTA-to-MTA opportunistic TLS (RFC
    # 7435); on: the hop's certificate must chain to the system CAs, or to relay_tls_ca_file
    # instead, and name the hop's host.
    relay_tls_verify: bool = False
    relay_tls_ca_file: str = ""
    # Comma-separated CIDRs whose clients may relay to foreign domains (besides each
    # customer's client_networks and AUTH users); the customer is the sender domain's owner.
    relay_networks: str = ""
    # Comma-separated CIDRs of load balancers that send a PROXY protocol (v1/v2) header;
    # their connections must start with one. Empty: PROXY protocol off.
    smtp_proxy_networks: str = ""
    # PEM files for STARTTLS ("" = none). Strings, not Optional: `mailmeta up` passes every
    # setting on as text, and None would come back as a file called "None".
    tls_cert: str = ""
    tls_key: str = ""
    # Local use: a self-signed certificate generated under data_dir/tls.
    tls_self_signed: bool = False
    ingest_workers: int = Field(default=1, ge=1, le=64)
    # Set by the parent of --workers N for each child: selects the spool subdir and metrics
    # port, and makes the child bind with SO_REUSEPORT beside its siblings.
    ingest_worker_index: int = Field(default=0, ge=0)
    ingest_reuse_port: bool = False
    # Prometheus metrics of the front end (0 = off); worker i listens on port + i.
    ingest_metrics_port: int = Field(default=0, ge=0, le=65535)
    smtp_max_message_size: int = Field(default=32 * 1024 * 1024, ge=1024)
    smtp_max_recipients: int = Field(default=1000, ge=100)  # RFC 5321: at least 100
    smtp_timeout: float = Field(default=300.0, gt=0)
    smtp_max_errors: int = Field(default=20, ge=1)
    smtp_max_connections_per_ip: int = Field(default=50, ge=1)
    # Broker acknowledgement wait before an event goes to the durable spool instead.
    ingest_spool_after_s: float = Field(default=2.0, gt=0)
    # Spool capacity; when full the front end answers 451. 0 disables the spool.
    ingest_spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=0)

    # --- webhooks (webhooks/) --------------------------------------------------------------
    # Comma-separated CIDRs webhook endpoints may resolve to although they are loopback,
    # private, link-local or metadata addresses (refused otherwise: SSRF). Empty: none.
    webhook_allow_networks: str = ""
    # How long a batch is retried (exponential backoff with jitter, Retry-After honoured)
    # before its events go to the endpoint's failure log.
    webhook_retry_horizon_s: float = Field(default=86400.0, gt=0)
    webhook_retry_base_s: float = Field(default=1.0, gt=0)
    webhook_retry_max_s: float = Field(default=600.0, gt=0)
    # Per request: connect + send + the (bounded) answer; the answer's body is never kept.
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_max_response_bytes: int = Field(default=64 * 1024, ge=0)
    webhook_batch_max: int = Field(default=100, ge=1, le=10_000)
    # Requests in flight over all endpoints (each endpoint has at most one: its order).
    webhook_concurrency: int = Field(default=32, ge=1)
    # Run the webhook stage inside the sink service (embedded chdb: the one store owner);
    # off, run it as its own process (`mailmeta webhooks`) against a ClickHouse server.
    webhooks_in_service: bool = False
    # Prometheus metrics of a stand-alone webhook stage (0 = off; inside the sink service its
    # metrics are on MAILMETA_SINK_METRICS_PORT).
    webhook_metrics_port: int = Field(default=0, ge=0, le=65535)

    @field_validator("api_trusted_proxies")
    @classmethod
    def _networks(cls, text: str) -> str:
        parse_networks(text, "MAILMETA_API_TRUSTED_PROXIES")
        return text

    @field_validator("webhook_allow_networks")
    @classmethod
    def _webhook_networks(cls, text: str) -> str:
        parse_networks(text, "MAILMETA_WEBHOOK_ALLOW_NETWORKS")
        return text

    @property
    def trusted_proxy_networks(self) -> list[str]:
        return [n.strip() for n in self.api_trusted_proxies.split(",") if n.strip()]

    @model_validator(mode="after")
    def _regional_topics(self) -> Settings:
        if self.region != DEFAULT_REGION:
            for name in TOPIC_SETTINGS:
                if name not in self.model_fields_set:
                    setattr(self, name, f"{getattr(self, name)}.{self.region}")
        return self

    def to_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """These settings as the MAILMETA_* environment of a child process, which reads them
        back into equal settings: ``base`` (e.g. ``os.environ``) with each field's variable
        set, or removed when the field is None (an unset optional stays unset, never the
        text "None"). Secrets are revealed (a child needs the password, not its mask);
        lists and mappings are JSON, as pydantic-settings reads them."""
        env = dict(base or {})
        for name in type(self).model_fields:
            key = f"MAILMETA_{name.upper()}"
            text = _env_text(getattr(self, name))
            if text is None:
                env.pop(key, None)
            else:
                env[key] = text
        return env

    def group_id(self, base: str) -> str:
        """A consumer group of this region: regions may share one Kafka cluster."""
        return base if self.region == DEFAULT_REGION else f"{base}.{self.region}"

    def streams_dir(self) -> Path:
        """Where the redaction worker keeps its files: under the data dir unless set."""
        return self.streams_data_dir or self.data_dir / "streams"

    def resolved_dsn(self) -> str:
        if self.clickhouse_dsn:
            return self.clickhouse_dsn
        return f"chdb://{(self.data_dir / 'clickhouse').resolve()}"


def _env_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | set | frozenset | dict):
        return json.dumps(value if isinstance(value, dict) else list(value), default=str)
    return str(value)
