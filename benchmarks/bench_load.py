"""Benchmark: the peak memory of ``load_model`` alone, against what the memory check assumes.

Usage (from the repository root; the interpreter decides the backend)::

    python benchmarks/bench_load.py                                   # TransformerLens 4: bridge
    .venv-tl3/bin/python benchmarks/bench_load.py --dtype float32,bfloat16   # 2.x/3.x: hooked

For each alias (default ``smollm2-135m`` and ``qwen2.5-coder-0.5b``, dequantised into the cache
on first use) and dtype, a fresh subprocess imports the stack (as ``bench_scale.py`` does),
loads the model with the default backend and reports the peak RSS above the imports
(``VmHWM``) over the weights' bytes in that dtype and over their float32 bytes, beside
the check's two thresholds (``headclass.loading.memory``): the least the load needs (it refuses
when even that does not fit: the weights with the bridge, ``HOOKED_LOAD_LEAST`` times their
float32 bytes with HookedTransformer) and the peak it warns about (the larger of
``HOOKED_LOAD_MOST`` times the float32 bytes and classify's expected peak). ``within`` says
whether the measured load peak lies between them: no load refused that would have fitted, none
that peaks above the warning.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_scale import GB, _import_stack, reset_hwm, vm_hwm, vm_rss, weight_bytes

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")


def child(alias: str, dtype_name: str) -> dict:
    import torch

    import headclass
    from headclass.loading import _dequantised_folder
    from headclass.loading.aliases import model_aliases
    from headclass.loading.memory import classify_peak_bytes, load_peak_bytes

    folder = _dequantised_folder(model_aliases()[alias])
    _import_stack(str(folder))
    base = vm_rss()
    reset_hwm()
    start = time.perf_counter()
    model = headclass.load_model(alias, dtype=dtype_name)
    seconds = time.perf_counter() - start
    peak = vm_hwm() - base
    weights = weight_bytes(folder, dtype_name)
    backend = model.backend  # the interpreter's default: "bridge" on TransformerLens 4, else "hooked"
    return {
        "model": alias,
        "dtype": dtype_name,
        "backend": backend,
        "load_s": seconds,
        "peak": peak,
        "weights": weights,
        "float32": weight_bytes(folder, "float32"),
        "assumed": load_peak_bytes(weights, getattr(torch, dtype_name), backend),  # (least, most)
        "classify_peak": classify_peak_bytes(weights),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=",".join(MODELS), help="comma-separated aliases")
    parser.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    print(f"python: {sys.executable}")
    for alias in args.model.split(","):
        for dtype_name in args.dtype.split(","):
            done = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child", alias, dtype_name],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            least, most = row["assumed"][0], max(row["assumed"][1], row["classify_peak"])
            print(
                f"{row['model']:<20} {row['dtype']:<9} {row['backend']:<7} load {row['load_s']:5.1f} s | "
                f"peak {row['peak'] / GB:5.2f} GB = {row['peak'] / row['weights']:.2f}x weights, "
                f"{row['peak'] / row['float32']:.2f}x float32 | check assumes {least / GB:.2f}-{most / GB:.2f} GB: "
                f"{'within' if least <= row['peak'] <= most else 'NOT within'}"
            )


if __name__ == "__main__":
    main()
