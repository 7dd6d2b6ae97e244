"""Stage 4 (beside the sink): POST redacted events to customers' endpoints, signed the
Standard Webhooks way, at least once, in order per endpoint, retried up to a horizon.

``WebhookStage`` consumes the redacted topic (its own group), queues each event for its
customer's endpoints in the store (durable) and delivers from there; ``Sender`` is one
SSRF-guarded, signed POST.
"""

from mailmeta.webhooks._main import main
from mailmeta.webhooks._send import Outcome, Sender, retry_after, signature, webhook_id
from mailmeta.webhooks._stage import EVENT_TYPE, GROUP_ID, WebhookStage

__all__ = [
    "EVENT_TYPE",
    "GROUP_ID",
    "Outcome",
    "Sender",
    "WebhookStage",
    "main",
    "retry_after",
    "signature",
    "webhook_id",
]
