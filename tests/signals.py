"""Child processes that a test interrupts with SIGINT.

A process started from a non-interactive background job (``(python -m pytest -q > log &)``)
inherits SIGINT as *ignored*; its children would too, and Python then installs no
KeyboardInterrupt handler, so a test's Ctrl-C would do nothing. Every test that sends SIGINT starts
its child through ``popen_interruptible``, which restores the default handler in the child first.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen_interruptible(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` whose child has SIGINT's default handler, whatever the caller has."""
    return subprocess.Popen(cmd, preexec_fn=_default_sigint, **kwargs)
