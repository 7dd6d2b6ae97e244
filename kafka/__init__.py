"""Kafka plumbing shared by every stage: client settings, topic definitions, the asyncio bridge.

Only standard Kafka APIs: the same code runs on Apache Kafka, Redpanda or a managed Kafka.
"""

from mailmeta.kafka._backlog import Backlog, group_backlog
from mailmeta.kafka._bridge import AsyncProducer, OutRecord, discard_futures
from mailmeta.kafka._clients import (
    KafkaConfigError,
    admin,
    check_connection,
    connection,
    consumer_config,
    faust_broker_options,
    producer_config,
)
from mailmeta.kafka._read import read_partition
from mailmeta.kafka._topics import (
    TopicError,
    check_topic_retention,
    ensure_topics,
    replication,
    topic_retention_ms,
)

__all__ = [
    "AsyncProducer",
    "Backlog",
    "KafkaConfigError",
    "OutRecord",
    "TopicError",
    "admin",
    "check_connection",
    "check_topic_retention",
    "connection",
    "consumer_config",
    "discard_futures",
    "ensure_topics",
    "faust_broker_options",
    "group_backlog",
    "producer_config",
    "read_partition",
    "replication",
    "topic_retention_ms",
]
