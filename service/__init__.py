"""The storage owner process: the sink stage and the query API over one store.

In embedded mode one process owns the chdb directory (docs/design.md), so the sink and every
reader of storage run together here. Run it with ``python -m mailmeta.service``.
"""

from mailmeta.service._service import SinkService

__all__ = ["SinkService"]
