"""Stage 3: land redacted events in the store (ClickHouse, per-row TTL), exactly once per event.

``SinkConsumer`` consumes, batches, inserts, and commits offsets only after the insert;
``DrainState`` tells when everything produced before a shutdown request is stored.
"""

from mailmeta.sinks._consumer import GROUP_ID, MAX_ROWS, SinkConsumer
from mailmeta.sinks._drain import DrainState

__all__ = ["GROUP_ID", "MAX_ROWS", "DrainState", "SinkConsumer"]
