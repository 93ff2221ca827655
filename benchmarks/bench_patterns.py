"""Benchmark: all attention-pattern scores in one pass vs a bare forward vs detect_head.

Usage (from the repository root)::

    python benchmarks/bench_patterns.py                      # smollm2-135m, 16 x 256, 3 repeats
    python benchmarks/bench_patterns.py --repeats 7 --detect-repeats 3 --threads 1 --detect-cached

On one token batch (``[BOS]`` + 3 copies of 85 random ordinary tokens = 256 tokens, 16
sequences) it times, interleaved within each repeat (the order rotates), and reports medians:

(a) ``bare``    ``model.forward(tokens, return_type=None)`` under ``torch.no_grad()`` (without it,
                autograd keeps every layer's activations: ~9 GB more peak memory on this batch);
(b) ``scores``  :func:`headclass.scores.patterns.pattern_measurement` on a probe that feeds EVERY
                registered score: the core scores with their standard errors, both attention
                budgets (text and repeated classes, base rates, lifts, SEs) and both positional
                consistencies, one forward pass (batch_size = the batch) with every layer's
                pattern reduced inside its hook. Worst case: a real run splits the budgets
                between the text and the repeated probe;
(b') ``core``   (with ``--core``) :func:`pattern_scores_single_pass` restricted to the 8 core
                scores (+ SEs), for comparison with the figures before the budget existed;
(c) ``detect``  TransformerLens' ``detect_head`` for previous-token, duplicate-token and
                induction heads on the same batch (three calls; each runs a cached forward per
                sequence, as ``detect_head`` does for a list of prompts);
(c') ``detect_cached`` (with ``--detect-cached``): the most economical use of ``detect_head``:
                one cached forward per sequence shared by the three head types.

Peak memory: each of bare / scores / detect runs once in a fresh subprocess, which loads the
model, warms up on a tiny batch, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``)
and reads ``VmHWM`` after the run. The reported figure is the peak above the RSS just before the
run, so model loading does not count. Claim checked: scores peak <= bare peak + one layer's
pattern tensor (``batch * heads * pos * pos * 4`` bytes).

(d) ``hooks``  (with ``--hooks``) the same :func:`pattern_measurement` on a stand-in model that
                replays one real layer pattern ``[16, 9, 256, 256]`` to the callback for each of
                the 30 layers, with no forward pass: the cost of the in-hook reductions alone,
                which is what the pattern pass adds to a forward (less noisy than the
                difference of two forwards on a loaded machine); ``hooks_core`` the same for
                the 8 core scores.

Also times (not a forward) ``bootstrap``: 200 replicates of every score from the per-sequence
sums. Prints a table, the ratios ``scores / bare`` (goal <= 1.1) and ``detect / scores`` (goal
>= 3), and a JSON line with every figure. ``--no-detect`` skips (c) and (c').
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import headclass
from headclass import probes
from headclass.scores.patterns import (
    PATTERN_SCORES,
    SCORE_NAMES,
    pattern_measurement,
    pattern_scores_single_pass,
)
from headclass.testing import FixedTokens, detect_head_scores

HEAD_TYPES = ("previous_token", "duplicate_token", "induction")


def make_probe(model, n_sequences: int, n_positions: int, seed: int = 0):
    """``[BOS]`` + copies of a random segment, cut to exactly ``n_positions`` tokens."""
    prepend = int(model.prepends_bos)
    segment = (n_positions - prepend) // 3
    probe = probes.repeated(model, n_sequences, segment, n_repeats=3, seed=seed)
    if probe.n_positions < n_positions:  # pad with a 4th partial copy to reach the exact length
        probe = probes.repeated(model, n_sequences, segment, n_repeats=4, seed=seed)
    return probes.from_tokens(
        model, probe.tokens[:, :n_positions], name="bench", scores=frozenset(PATTERN_SCORES)
    )  # feeds every score, text and _rep


def detect_cached(model, tokens):
    """detect_head for the three types with one shared cache per sequence."""
    from transformer_lens.head_detector import detect_head

    stand_in = FixedTokens(model.tl_model, tokens)
    names = {
        "previous_token": "previous_token_head",
        "duplicate_token": "duplicate_token_head",
        "induction": "induction_head",
    }
    totals = {name: 0.0 for name in HEAD_TYPES}
    with torch.no_grad():
        for i in range(tokens.shape[0]):
            _, cache = model.tl_model.run_with_cache(tokens[i : i + 1], remove_batch_dim=True)
            for name in HEAD_TYPES:
                totals[name] = totals[name] + detect_head(stand_in, str(i), names[name], cache=cache)
            del cache
    return {name: value / tokens.shape[0] for name, value in totals.items()}


def bare_forward(model, tokens):
    """The forward pass alone, without autograd (as run_with_patterns and detect_head run)."""
    with torch.no_grad():
        return model.forward(tokens, return_type=None)


def full_pass(model, probe):
    """Every registered score on one batch, one forward pass."""
    return pattern_measurement(model, probe, batch_size=probe.n_sequences, progress=False)


class Replay:
    """The model, but ``run_with_patterns`` replays one stored pattern for every layer."""

    def __init__(self, model, pattern):
        self._model, self._pattern = model, pattern

    def __getattr__(self, name):
        return getattr(self._model, name)

    def run_with_patterns(self, tokens, callback, *, layers=None):
        for layer in range(self._model.n_layers):
            callback(layer, self._pattern)


def captured_pattern(model, probe, layer: int = 10):
    """One real attention pattern ``[batch, head, query, key]`` of ``probe``."""
    kept = {}

    def keep(index, pattern):
        if index == layer:
            kept["pattern"] = pattern.clone()

    model.run_with_patterns(probe.tokens, keep, layers=range(layer + 1))
    return kept["pattern"]


def variants(model, probe, with_cached: bool, with_detect: bool = True, with_core: bool = False, replay=None):
    tokens = probe.tokens
    out = {
        "bare": lambda: bare_forward(model, tokens),
        "scores": lambda: full_pass(model, probe),
    }
    if with_core:
        out["core"] = lambda: pattern_scores_single_pass(model, probe, scores=SCORE_NAMES)
    if replay is not None:
        out["hooks"] = lambda: full_pass(replay, probe)
        out["hooks_core"] = lambda: pattern_scores_single_pass(replay, probe, scores=SCORE_NAMES)
    if with_detect:
        out["detect"] = lambda: [detect_head_scores(model, tokens, name) for name in HEAD_TYPES]
    if with_detect and with_cached:
        out["detect_cached"] = lambda: detect_cached(model, tokens)
    return out


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> None:
    """Run one variant once in this fresh process and print its peak memory as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = headclass.load_model(args.model)
    probe = make_probe(model, args.n_sequences, args.n_positions)
    small = make_probe(model, 2, 32)
    variants(model, small, True, args.child.startswith("detect"), args.child == "core")[args.child]()  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    variants(model, probe, True, args.child.startswith("detect"), args.child == "core")[args.child]()
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    print(
        json.dumps(
            {
                "variant": args.child,
                "rss_before_mib": before / 1024,
                "peak_mib": peak / 1024,
                "peak_above_mib": (peak - before) / 1024,
                "seconds": seconds,
            }
        )
    )


def measure_memory(args) -> dict:
    results = {}
    for name in ("bare", "scores") + (() if args.no_detect else ("detect",)):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--model",
            args.model,
            "--n-sequences",
            str(args.n_sequences),
            "--n-positions",
            str(args.n_positions),
            "--threads",
            str(args.threads),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            raise RuntimeError(f"memory child {name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(lines[-1])
        print(
            f"  memory {name:7s}: peak {results[name]['peak_above_mib']:8.1f} MiB above "
            f"{results[name]['rss_before_mib']:.0f} MiB",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-sequences", type=int, default=16)
    parser.add_argument("--n-positions", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--detect-repeats", type=int, default=None, help="repeats of the slow detect variants (default: --repeats)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--detect-cached", action="store_true", help="also time (c') detect_cached")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    parser.add_argument("--no-detect", action="store_true", help="skip the detect_head variants")
    parser.add_argument("--core", action="store_true", help="also time (b') the core scores alone")
    parser.add_argument("--hooks", action="store_true", help="also time (d) the in-hook reductions alone")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = headclass.load_model(args.model)
    probe = make_probe(model, args.n_sequences, args.n_positions)
    B, P, H = probe.n_sequences, probe.n_positions, model.n_heads
    layer_pattern_mib = B * H * P * P * 4 / 2**20
    print(
        f"model {model.name}: {model.n_layers} layers x {H} heads; batch {B} x {P} tokens; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    detect = not args.no_detect
    small_probe = make_probe(model, 2, 32)
    replay = Replay(model, captured_pattern(model, probe)) if args.hooks else None
    small_replay = Replay(model, captured_pattern(model, small_probe)) if args.hooks else None
    runs = variants(model, probe, args.detect_cached, detect, args.core, replay)
    small = variants(model, small_probe, args.detect_cached, detect, args.core, small_replay)
    for fn in small.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    detect_repeats = args.repeats if args.detect_repeats is None else args.detect_repeats
    for repeat in range(args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            if name.startswith("detect") and repeat >= detect_repeats:
                continue
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
            print(
                f"  repeat {repeat + 1}/{args.repeats} {name:13s} {times[name][-1]:8.2f} s "
                f"(load {os.getloadavg()[0]:.1f})",
                flush=True,
            )

    measured = full_pass(model, probe)
    start = time.perf_counter()
    measured.bootstrap(200, seed=0)
    bootstrap_s = time.perf_counter() - start
    print(f"  bootstrap: 200 replicates of every score from the per-sequence sums in {bootstrap_s:.2f} s")
    budget = [k for k in measured.scores if k.startswith("budget_rep_") and k.count("_") == 2]
    total = sum(measured.scores[k] for k in budget)
    print(f"  budget_rep classes {len(budget)}: max |sum - 1| = {float((total - 1).abs().max()):.2e}")

    median = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    print(f"\n{'variant':14s} {'median s':>9s} {'min s':>9s}   all")
    for name in names:
        print(f"{name:14s} {median[name]:9.2f} {best[name]:9.2f}   " + " ".join(f"{t:.2f}" for t in times[name]))
    ratios = {"scores/bare": median["scores"] / median["bare"]}
    for name in ("core", "hooks", "hooks_core"):
        if name in median:
            ratios[f"{name}/bare"] = median[name] / median["bare"]
    if "hooks" in median:
        ratios["(bare+hooks)/bare"] = (median["bare"] + median["hooks"]) / median["bare"]
    if "detect" in median:
        ratios["detect/scores"] = median["detect"] / median["scores"]
    if "detect_cached" in median:
        ratios["detect_cached/scores"] = median["detect_cached"] / median["scores"]
    for key, value in ratios.items():
        top, bottom = key.split("/")
        extra = f"  (min-based {best[top] / best[bottom]:.2f})" if top in best and bottom in best else ""
        print(f"ratio {key:22s} {value:6.2f}{extra}")

    memory = {} if args.no_memory else measure_memory(args)
    if memory:
        bound = memory["bare"]["peak_above_mib"] + layer_pattern_mib
        print(
            f"memory: scores peak {memory['scores']['peak_above_mib']:.1f} MiB <= bare peak "
            f"{memory['bare']['peak_above_mib']:.1f} + one layer's pattern {layer_pattern_mib:.1f} "
            f"= {bound:.1f} MiB: {memory['scores']['peak_above_mib'] <= bound}"
        )
    print(
        json.dumps(
            {
                "model": model.name,
                "batch": B,
                "positions": P,
                "threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "times_s": times,
                "median_s": median,
                "ratios": ratios,
                "layer_pattern_mib": layer_pattern_mib,
                "bootstrap_200_s": bootstrap_s,
                "memory": memory,
            }
        )
    )


if __name__ == "__main__":
    main()
