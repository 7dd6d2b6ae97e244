"""Process settings, shared by every stage through MAILMETA_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from mailmeta import schema

DEFAULT_CONFIG = Path(__file__).with_name("customers.example.yaml")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAILMETA_", extra="ignore")

    config: Path = DEFAULT_CONFIG
    data_dir: Path = Path(".mailmeta")
    kafka_bootstrap: str = "127.0.0.1:9092"
    raw_topic: str = schema.RAW_TOPIC
    redacted_topic: str = schema.REDACTED_TOPIC
    deadletter_topic: str = schema.DEADLETTER_TOPIC
    partitions: int = Field(default=3, ge=1)
    # Unredacted metadata must not outlive what customers were promised: keep it hours.
    raw_retention_hours: int = Field(default=6, ge=1)
    # "chdb:///abs/dir" (embedded) or "http(s)://user:pass@host:8123/db" (server).
    clickhouse_dsn: str = ""
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 2525
    api_host: str = "127.0.0.1"
    api_port: int = 8025
    # Local mode: librdkafka waits ~half a session timeout before a group join completes.
    session_timeout_ms: int = 6000
    log_level: str = "info"

    def resolved_dsn(self) -> str:
        if self.clickhouse_dsn:
            return self.clickhouse_dsn
        return f"chdb://{(self.data_dir / 'clickhouse').resolve()}"
