"""Stage 2: apply each customer's redaction policy, raw topic -> redacted topic (faust).

Run it with ``python -m mailmeta.streams``; the policies themselves live in ``mailmeta.policy``.
"""

from mailmeta.streams.app import create_app

__all__ = ["create_app"]
