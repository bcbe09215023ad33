"""Handing freed heap memory back to the OS (peak RSS of a training run: docs/performance.md).

PyTorch's CPU allocator has no cache: a freed tensor goes back to ``malloc``. glibc returns a large block to the OS
at once only while it is above the mmap threshold, and that threshold grows (up to 32 MB) with every large block
freed, so blocks of a few MB end up on the heap and the pages of freed ones can stay resident.
``trim_heap`` (glibc ``malloc_trim(0)``) releases the free pages. ``herl_core.rollout.packed`` calls it when it
frees its packed weight copies: in a SmolLM2 test about 0.1 GB of the 0.54 GB of copies stayed resident without it,
and a 4-step ``cpu`` run peaked at 6.02 GB with it against 6.12 GB without (same samples, docs/performance.md).
Called after each update as well, it did not lower that run's peak (6.10 GB), which is the update's own working
set, so the trainer does not call it. A no-op returning False where glibc is not the C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (None elsewhere: macOS, musl, Windows)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Release free heap pages to the OS (glibc ``malloc_trim(0)``); False where there is no such call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
