"""What every benchmark prints first, so a figure can be reproduced and judged: the command
line that produced it and how loaded the machine was (these machines are noisy)."""

from __future__ import annotations

import os
import shlex
import sys


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return (
        f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min), {os.cpu_count()} cores"
    )


def header() -> None:
    """``command: …`` and ``machine: …`` lines."""
    print(f"command: python {shlex.join(sys.argv)}", flush=True)
    print(f"machine: {loadavg()}", flush=True)
