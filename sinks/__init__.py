"""Stage 3: land redacted events in the store (ClickHouse, per-row TTL), exactly once per event.

``SinkConsumer`` consumes, batches (``_batch``, pure), inserts (``_writer``, with the retry of
``_retry``), and commits offsets only after the insert;
``DrainState`` tells when everything produced before a shutdown request is stored;
``LagMonitor`` and ``serve_metrics``: Prometheus metrics (MAILMETA_SINK_METRICS_PORT).
"""

from mailmeta.sinks._consumer import GROUP_ID, MAX_ROWS, SinkConsumer
from mailmeta.sinks._drain import DrainState
from mailmeta.sinks._metrics import LagMonitor
from mailmeta.sinks._metrics import serve as serve_metrics

__all__ = ["GROUP_ID", "MAX_ROWS", "DrainState", "LagMonitor", "SinkConsumer", "serve_metrics"]
