"""Regions side by side in local mode: one cell (broker, sink + API, worker, front end) per
region of the customers file, each with its own data dir, ports and topics, so that no
event of a customer pinned to a region is ever in another region's broker or store."""

from __future__ import annotations

from mailmeta.config import TOPIC_SETTINGS, ConfigError, Settings

_PORTS = ("smtp_port", "api_port", "ingest_metrics_port", "streams_metrics_port")


def cell_settings(base: Settings, region: str, index: int, port_step: int) -> Settings:
    """The settings of region number ``index`` (0: the default region, ``base`` itself).

    Its ports are the default region's plus ``index * port_step`` (0 stays off), its data dir
    ``regions/<name>`` under the default one (its own chdb store and Kafka log), its topics
    the default region's names with the region as suffix, whatever those were set to."""
    if index == 0:
        return base
    if base.clickhouse_dsn:
        raise ConfigError(
            "MAILMETA_CLICKHOUSE_DSN is set, but each region needs its own store: in local "
            "mode with regions, leave it unset (each region's chdb store is in its data dir)"
        )
    values = base.model_dump()
    values.update(
        region=region,
        data_dir=base.data_dir / "regions" / region,
        operator_token_file=None,
        **{t: f"{getattr(base, t)}.{region}" for t in TOPIC_SETTINGS},
        **{p: getattr(base, p) + index * port_step for p in _PORTS if getattr(base, p)},
    )
    return Settings(**values)
