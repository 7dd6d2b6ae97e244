"""The SMTP front end: mail servers relay through it; only allow-listed header metadata
becomes events on the raw topic, and the body never leaves the process."""

from mailmeta.ingest._auth import hash_password
from mailmeta.ingest._extract import HeaderFields, decode_rfc2047, extract_headers
from mailmeta.ingest._handler import IngestHandler
from mailmeta.ingest._producer import DeliveryError, EventProducer
from mailmeta.ingest._spool import Spool, SpoolFull
from mailmeta.ingest.server import DATA_SIZE_LIMIT, IngestServer

__all__ = [
    "DATA_SIZE_LIMIT",
    "DeliveryError",
    "EventProducer",
    "HeaderFields",
    "IngestHandler",
    "IngestServer",
    "Spool",
    "SpoolFull",
    "decode_rfc2047",
    "extract_headers",
    "hash_password",
]
