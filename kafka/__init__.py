"""Kafka plumbing shared by every stage: client settings, topic definitions, the asyncio bridge.

Only standard Kafka APIs: the same code runs on Apache Kafka, Redpanda or a managed Kafka.
"""

from mailmeta.kafka._topics import check_topic_retention, ensure_topics, topic_retention_ms

__all__ = ["check_topic_retention", "ensure_topics", "topic_retention_ms"]
