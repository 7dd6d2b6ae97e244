"""``python -m mailmeta.webhooks``: the webhook stage (see webhooks/_main.py)."""

import sys

from mailmeta.webhooks import main

sys.exit(main())
