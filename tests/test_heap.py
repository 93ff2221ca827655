"""glibc heap settings (headclass.heap): page faults counted, not timed.

A block served by a mapping of its own is zero-filled by the kernel page by page when written
(a minor fault per 4 KiB page); a block the heap hands back again is already resident. So the
minor faults of writing an 8 MiB block again and again say which setting is in force, without
a clock. Each scenario runs in a fresh interpreter: a heap that earlier tests left with free
holes would serve a block from a hole whatever the setting.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from headclass import heap

pytestmark = pytest.mark.skipif(
    not hasattr(heap._libc(), "mallinfo2"), reason="the heap settings apply to glibc (Linux); mallinfo2 needs 2.33"
)

BLOCK = 8 << 20  # between the two thresholds: mapped on its own outside, from the heap within
PAGES = BLOCK // 4096

_HELPERS = f"""
import ctypes, json, resource
import torch
from headclass import heap

BLOCK = {BLOCK}
out = {{}}

def faults(times, size=BLOCK):
    # minor page faults of allocating, writing and freeing a block `times` times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        block = torch.empty(size, dtype=torch.uint8)
        block.fill_(1)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped(size):
    # whether malloc serves a block of `size` bytes with a mapping of its own
    before = libc.mallinfo2().hblks
    block = torch.empty(size, dtype=torch.uint8)
    return libc.mallinfo2().hblks == before + 1

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()

faults(1)  # warm: torch's first allocation of this size
# After a context the heap keeps free holes (trimmed, not resident) that serve blocks which fit
# whatever the setting: the blocks that check the setting is back are larger than the holes of
# these scenarios (8 MiB blocks, a growth or two).
LARGE = 3 * BLOCK
"""


def _run(scenario: str) -> dict:
    code = _HELPERS + textwrap.dedent(scenario) + "\nprint(json.dumps(out))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_within_the_passes_only():
    out = _run(
        """
        heap.return_freed_memory()
        out["loading"] = faults(10), mapped(BLOCK)
        with heap.reuse_freed_memory():
            faults(1)  # the heap grows once
            out["passes"] = faults(10), mapped(BLOCK)
        out["after"] = faults(10, LARGE), mapped(LARGE)
        """
    )
    assert out["loading"][0] >= 10 * PAGES * 0.9 and out["loading"][1], out  # mapped: faulted afresh
    assert out["passes"][0] < 3 * PAGES and not out["passes"][1], out  # the heap's resident pages
    assert out["after"][0] >= 30 * PAGES * 0.9 and out["after"][1], out  # the loading setting is back


def test_the_heap_keeps_freed_blocks_within_the_passes_and_gives_them_back_after():
    out = _run(
        """
        with heap.reuse_freed_memory():
            held = [torch.ones(BLOCK, dtype=torch.uint8) for _ in range(3)]  # below the trim threshold
            out["held"] = rss()
            del held
            out["kept"] = rss()
        out["trimmed"] = rss()
        """
    )
    assert out["kept"] > out["held"] - BLOCK, out  # freed, but kept resident within the context
    assert out["trimmed"] < out["kept"] - 2 * BLOCK, out  # leaving it gives the heap back


def test_nested_contexts_reuse_until_the_outermost_ends_even_when_it_raises():
    out = _run(
        """
        heap.return_freed_memory()
        try:
            with heap.reuse_freed_memory():
                with heap.reuse_freed_memory():
                    faults(1)
                heap.return_freed_memory()  # waits for the context: no change inside a pass
                out["outer"] = faults(10), mapped(BLOCK)
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        out["depth"] = heap._state["depth"]
        out["after"] = faults(10, LARGE), mapped(LARGE)
        """
    )
    assert out["outer"][0] < 3 * PAGES and not out["outer"][1], out
    assert out["depth"] == 0, out
    assert out["after"][0] >= 30 * PAGES * 0.9 and out["after"][1], out
