"""Giving memory back between the stages of a long run."""

from __future__ import annotations

import ctypes
import gc
import sys


def release_memory() -> None:
    """Collect what is unreachable and give the freed heap back to the system: glibc keeps it otherwise (after a
    training, about 1.7 GB of it), so each later stage would start that much higher."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
