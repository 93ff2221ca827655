"""glibc's heap, set for the two phases of a run: loading weights, then forward passes.

Large CPU tensors come from ``malloc``. glibc serves a block at or above its mmap threshold with
a mapping of its own, returned to the kernel on ``free`` and zero-filled page by page (one page
fault each 4 KiB) when the next block is written; smaller blocks come from the heap, which keeps
them when freed. The two phases want opposite settings:

* **loading** (:func:`return_freed_memory`): weights are replaced tensor by tensor, and a heap
  keeps each freed weight-sized block resident long after it was released (+0.3-0.6 GB on
  Qwen2.5-0.5B), so blocks from 1 MiB up get mappings of their own;
* **passes** (:func:`reuse_freed_memory`): every batch allocates the same activations again. With
  mappings of their own, each is faulted in afresh: 1.2 M page faults, a third of a Qwen2.5-0.5B
  bfloat16 pattern pass (14 s against 9.5 s with the heap). Within the context blocks below
  32 MiB stay in the heap for the next batch to reuse; leaving it gives the heap back.

Process-wide (``mallopt``); a no-op where the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading
from typing import Any, Iterator, Optional

__all__ = ["return_freed_memory", "reuse_freed_memory"]

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks from this size up are mapped on their own outside the passes.
RELEASE_FROM = 1 << 20
#: Blocks below this size stay in the heap within :func:`reuse_freed_memory`: glibc's largest
#: mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``, 32 MiB); it refuses more.
REUSE_BELOW = 32 << 20
#: Free heap top kept within :func:`reuse_freed_memory`: a loop's blocks freed together (the
#: top-k's logits and its counter's temporaries: ~50 MB on SmolLM2) are not given back and
#: faulted in again each time (SmolLM2 bf16 top-k 2.0 -> 1.5 s against 32 MiB, same peak).
_TRIM_REUSE = 128 << 20
#: glibc's default trim threshold: free heap top above it goes back to the kernel.
_TRIM_DEFAULT = 128 << 10

_lock = threading.Lock()
_state = {"depth": 0}  # how many reuse_freed_memory contexts are open


@functools.cache
def _libc() -> Optional[Any]:
    """glibc, or None (not Linux, or another C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and others
        return None
    return libc if all(hasattr(libc, name) for name in ("mallopt", "malloc_trim")) else None


def return_freed_memory() -> None:
    """Serve blocks >= 1 MiB with mappings of their own, returned to the kernel when freed.

    By default glibc raises its mmap threshold as large blocks are freed, after which freed
    weight-sized blocks stay in the heap: loading a model then shows as resident memory long
    after it was released. Process-wide; inside :func:`reuse_freed_memory` it waits for the
    context to end (which restores the same setting).
    """
    libc = _libc()
    with _lock:
        if libc is not None and not _state["depth"]:
            libc.mallopt(_M_MMAP_THRESHOLD, RELEASE_FROM)


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within: blocks below 32 MiB come from the heap and stay there when freed (up to 128 MiB of free heap top).

    For loops of forward passes, whose batches allocate the same activations again and again:
    the heap hands back the freed blocks, already resident, instead of fresh mappings that the
    kernel zero-fills a page at a time. The heap holds what the passes held at most, plus
    fragmentation. On leaving, the loading setting (:func:`return_freed_memory`) returns and
    ``malloc_trim`` gives the heap's free pages back to the kernel. Re-entrant; process-wide.
    """
    libc = _libc()
    if libc is None:
        yield
        return
    with _lock:
        if not _state["depth"]:
            libc.mallopt(_M_MMAP_THRESHOLD, REUSE_BELOW)
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_REUSE)
        _state["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["depth"] -= 1
            if not _state["depth"]:
                libc.mallopt(_M_MMAP_THRESHOLD, RELEASE_FROM)
                libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_DEFAULT)
                libc.malloc_trim(0)
