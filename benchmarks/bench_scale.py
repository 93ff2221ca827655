"""Benchmark: memory and time of ``classify`` on three model sizes, against plain transformers.

Usage (from the repository root)::

    python benchmarks/bench_scale.py                                   # the three models, float32
    python benchmarks/bench_scale.py --model qwen2.5-coder-0.5b --dtype float32,bfloat16
    python benchmarks/bench_scale.py --model smollm2-135m --breakdown   # memory per stage
    python benchmarks/bench_scale.py --threads 1     # on a machine other jobs oversubscribe

For each model (aliases ``smollm2-135m``, ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``; the first
use fetches and dequantises them into the cache, reported apart) and dtype, two fresh
subprocesses run one after the other, never at once:

(a) ``headclass``: ``load_model(alias, dtype=...)`` then ``classify(model)`` with the defaults
    (probes, batch size, every pattern and weight score), as ``headclass classify`` runs them;
(b) ``transformers``: ``AutoModelForCausalLM.from_pretrained(folder, dtype=...)`` of the same
    cached folder, then a bare forward (``model.model(ids)``: no unembedding, default
    attention kernel, ``torch.no_grad()``) over the very probe batches (a) used.

Where classify's time goes is printed under each row (timers around the stages it calls, each
over the bare forward): the hooked pattern pass (every pattern score reduced in its hooks), the
weight scores (the top-k copy scores apart), the head cards' evidence, and labelling with the
bootstrap.

Peak memory is the kernel's ``VmHWM`` (peak RSS). ``peak/weights`` divides the peak above the
interpreter's RSS after imports (torch, transformers with the model's modeling module,
TransformerLens, scipy: ~0.5 GB, the same for any model of that
architecture) by the bytes of the model's weights in the dtype used (the tensors of the cached
``model.safetensors``, converted to that dtype); the total peak is printed beside it. Goals:
``peak/weights <= 1.5``; ``classify/forward <= 1.3`` (classify time, load excluded, over the
bare forward's time); load time is shown beside transformers' ``from_pretrained``.

``--breakdown`` also reports, in (a), the peak above the RSS before each stage: load, the
embedding and unembedding (``W_E, W_U``), pattern scores, weight scores (which read the
per-head weights a layer at a time: no stacked copy). A JSON line per run follows the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
GB = 1e9


def vm_hwm() -> int:
    """Peak RSS of this process in bytes since start or the last :func:`reset_hwm`."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024


def vm_rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024


def reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def weight_bytes(folder: Path, dtype_name: str) -> int:
    """Bytes of the folder's tensors in ``dtype_name`` (safetensors headers only), as
    ``load_model`` sizes them before loading."""
    import torch

    from headclass.loading.memory import folder_weight_bytes

    size = folder_weight_bytes(folder, getattr(torch, dtype_name))
    assert size is not None, f"{folder} has no safetensors files"
    return size


def _import_stack(folder: str) -> None:
    """Import the code classify runs, so the baseline RSS holds the fixed cost of the libraries.

    That is torch, transformers with the model's own modeling module (Qwen2's alone is ~0.12 GB
    of RSS, imported when the first model of that architecture loads), TransformerLens, and
    what the scores import: scipy.stats. Code, not data: the same for any model of that
    architecture, whatever its size. (Until 2026-12-07 torch's compiler too, for the fused
    top-k counter; the scores no longer compile anything.)
    """
    import scipy.stats  # noqa: F401
    import transformer_lens  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    import headclass.report.cards  # noqa: F401
    import headclass.scores.weights  # noqa: F401

    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(folder))]  # imports its module


# -- children ----------------------------------------------------------------------------------


_STAGES = (
    ("pattern_pass", "headclass.scores.patterns", "pattern_measurement"),
    ("weight_scores", "headclass.scores.weights", "weight_scores"),
    ("topk", "headclass.scores.weights", "_topk_scores"),
    ("cards", "headclass.scores.examples", "head_evidence"),
    ("labelling", "headclass.taxonomy.classification", "label_heads"),
)


def _time_stages(seconds: dict) -> None:
    """Wrap the functions ``classify`` calls for each stage with a timer adding to ``seconds``."""
    import functools
    import importlib

    for stage, module_name, name in _STAGES:
        module = importlib.import_module(module_name)
        inner = getattr(module, name)

        def timed(*args, _inner=inner, _stage=stage, **kwargs):
            start = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                seconds[_stage] = seconds.get(_stage, 0.0) + time.perf_counter() - start

        setattr(module, name, functools.wraps(inner)(timed))


def child_prepare(alias: str) -> dict:
    """Fetch and dequantise the alias into the cache (once); report what it cost."""
    from headclass.loading import _dequantised_folder
    from headclass.loading.aliases import cache_dir, model_aliases

    folder = cache_dir() / alias / "hf"
    cached = (folder / "config.json").is_file()
    start = time.perf_counter()
    folder = _dequantised_folder(model_aliases()[alias])
    return {
        "folder": str(folder),
        "dequantised_now": not cached,
        "prepare_s": time.perf_counter() - start,
        "prepare_peak": vm_hwm(),
    }


def child_headclass(alias: str, folder: str, dtype: str, tokens_out: str, breakdown: bool) -> dict:
    import torch

    import headclass
    from headclass.config import load_config
    from headclass.probes import default_probes

    _import_stack(folder)
    base = vm_rss()
    reset_hwm()
    start = time.perf_counter()
    model = headclass.load_model(alias, dtype=dtype)
    out = {
        "load_s": time.perf_counter() - start,
        "load_peak": vm_hwm() - base,
        "n_params_tl": model.n_params,
        "base_rss": base,
    }
    cfg = load_config(None)
    probes = default_probes(model, cfg)
    torch.save([p.tokens for p in probes], tokens_out)
    if breakdown:
        from headclass.scores.patterns import pattern_scores
        from headclass.scores.weights import weight_scores

        for stage, run in (
            ("weights", lambda: [getattr(model, k) for k in ("W_E", "W_U")]),
            ("patterns", lambda: pattern_scores(model, probes, config=cfg, progress=False)),
            ("weight_scores", lambda: weight_scores(model, config=cfg)),
        ):
            before = vm_rss()
            reset_hwm()
            start = time.perf_counter()
            run()
            out[f"{stage}_s"] = time.perf_counter() - start
            out[f"{stage}_peak_above"] = vm_hwm() - before
            out[f"{stage}_rss_before"] = before - base
        return out
    stages: dict = {}
    _time_stages(stages)
    reset_hwm()
    start = time.perf_counter()
    headclass.classify(model, progress=False)
    out["classify_s"] = time.perf_counter() - start
    out.update({f"{stage}_s": value for stage, value in stages.items()})
    out["peak"] = max(vm_hwm(), out["load_peak"] + base) - base
    out["peak_total"] = out["peak"] + base
    return out


def child_transformers(folder: str, dtype: str, tokens_in: str, batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    _import_stack(folder)
    base = vm_rss()
    reset_hwm()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    out = {"hf_load_s": time.perf_counter() - start}
    batches = [b for tokens in torch.load(tokens_in) for b in tokens.split(batch_size)]
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model.model(input_ids=batch)
    out["forward_s"] = time.perf_counter() - start
    out["hf_peak"] = vm_hwm() - base
    out["n_tokens"] = int(sum(b.numel() for b in batches))
    return out


# -- parent ------------------------------------------------------------------------------------


def run_child(*args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench(alias: str, dtype: str, breakdown: bool) -> dict:
    from headclass.config import load_config

    prepared = run_child("prepare", alias)
    folder = Path(prepared["folder"])
    with tempfile.TemporaryDirectory() as tmp:
        tokens = str(Path(tmp) / "tokens.pt")
        ours = run_child("headclass", alias, str(folder), dtype, tokens, str(int(breakdown)))
        theirs = run_child("transformers", str(folder), dtype, tokens, str(load_config(None).probes.batch_size))
    row = {"model": alias, "dtype": dtype, "weights": weight_bytes(folder, dtype), **prepared, **ours, **theirs}
    if not breakdown:
        row["peak_ratio"] = row["peak"] / row["weights"]
        row["time_ratio"] = row["classify_s"] / row["forward_s"]
    return row


def print_row(row: dict) -> None:
    w = row["weights"]
    head = f"{row['model']:<20} {row['dtype']:<9} weights {w / GB:5.2f} GB"
    if row["dequantised_now"]:
        print(
            f"{'':<20} first use: fetch + dequantise {row['prepare_s']:.0f} s, peak {row['prepare_peak'] / GB:.2f} GB"
        )
    if "classify_s" in row:
        print(
            f"{head} | peak {row['peak'] / GB:5.2f} GB = {row['peak_ratio']:.2f}x weights "
            f"(total RSS {row['peak_total'] / GB:.2f} GB; transformers load+forward {row['hf_peak'] / GB:.2f} GB)"
            f" | classify {row['classify_s']:6.1f} s / bare forward {row['forward_s']:6.1f} s"
            f" = {row['time_ratio']:.2f} | load {row['load_s']:5.1f} s (peak {row['load_peak'] / GB:.2f} GB)"
            f" vs transformers {row['hf_load_s']:.1f} s"
        )
        split = ", ".join(
            f"{stage.replace('_', ' ')} {row[f'{stage}_s']:.1f} s ({row[f'{stage}_s'] / row['forward_s']:.2f}x)"
            for stage, _, _ in _STAGES
            if f"{stage}_s" in row
        )
        outer = [stage for stage, _, _ in _STAGES if stage != "topk"]  # top-k lies within weight_scores
        rest = row["classify_s"] - sum(row.get(f"{stage}_s", 0.0) for stage in outer)
        print(f"{'':<20} classify / bare forward, by stage: {split}, the rest {rest:.1f} s")
    else:
        stages = " | ".join(
            f"{s}: +{row[f'{s}_peak_above'] / GB:.2f} GB over {row[f'{s}_rss_before'] / GB:.2f} GB"
            f" in {row[f'{s}_s']:.1f} s"
            for s in ("weights", "patterns", "weight_scores")
        )
        print(f"{head} | load peak {row['load_peak'] / GB:.2f} GB in {row['load_s']:.1f} s | {stages}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, args = sys.argv[2], sys.argv[3:]
        if os.environ.get("BENCH_THREADS"):
            import torch

            torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
        if kind == "prepare":
            result = child_prepare(*args)
        elif kind == "headclass":
            result = child_headclass(args[0], args[1], args[2], args[3], bool(int(args[4])))
        else:
            result = child_transformers(args[0], args[1], args[2], int(args[3]))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=",".join(MODELS), help="comma-separated aliases")
    parser.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16")
    parser.add_argument("--breakdown", action="store_true", help="memory per stage instead of classify")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per child (default: torch's; 1 on an oversubscribed machine)",
    )
    options = parser.parse_args()
    if options.threads:
        os.environ["BENCH_THREADS"] = str(options.threads)
    import torch

    threads = options.threads or torch.get_num_threads()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {os.cpu_count()} CPUs, {threads} torch thread(s) per child; uptime: {load}")
    rows = []
    for alias in options.model.split(","):
        for dtype in options.dtype.split(","):
            row = bench(alias, dtype, options.breakdown)
            print_row(row)
            sys.stdout.flush()
            rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
