"""The sink stage: redacted events -> ClickHouse (per-row TTL), and the query API.

Run it with ``python -m mailmeta.sinks``; in-process use: ``SinkService(settings,
customers).start()`` / ``.stop()``, or the parts: ``create_api``, ``SinkConsumer``,
``DrainState`` and ``mailmeta.sinks.store``.
"""

from mailmeta.sinks._api import create_api
from mailmeta.sinks._consumer import GROUP_ID, SinkConsumer
from mailmeta.sinks._drain import DrainState
from mailmeta.sinks._service import SinkService

__all__ = ["GROUP_ID", "DrainState", "SinkConsumer", "SinkService", "create_api"]
