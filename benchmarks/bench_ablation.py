"""Benchmark: head ablation on SmolLM2-135M (30 layers x 9 heads = 270 heads).

Times, on one probe (by default the induction probe: 4 sequences of BOS + 2 x 64 repeated
random tokens = 4 x 129 tokens):

1. exact ablation of every head (``ablation_dloss``, ``mode="exact"``: residual cache, restart
   at the head's layer, the 9 heads of a layer in one replicated pass, logits only where the
   loss counts);
2. the one-head-per-full-forward reference (``ablation_dloss_reference``) on a subset of
   heads, extrapolated linearly to 270 heads (each reference run costs the same full forward,
   whatever the head) -- stated as an extrapolation in the output;
3. attribution patching for every head (``mode="attribution"``, one forward + backward) and its
   Spearman rank correlation with the exact result.

Run from the repository root::

    python benchmarks/bench_ablation.py                     # induction probe, mean ablation
    python benchmarks/bench_ablation.py --probe text --method zero --json out.json
    python benchmarks/bench_ablation.py --threads 1          # on a busy shared machine

The machine load (``os.getloadavg``) is printed with every timing: on a shared machine the
numbers are upper bounds of what the code needs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import headclass
from headclass import probes
from headclass.scores.ablation import (
    ablation_dloss,
    induction_targets,
    rank_correlation,
)
from headclass.testing import ablation_dloss_reference


def _load() -> str:
    return "load avg %.1f/%.1f/%.1f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--probe", choices=["induction", "text"], default="induction")
    parser.add_argument("--method", choices=["mean", "zero"], default="mean")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence, BOS excluded")
    parser.add_argument(
        "--reference-heads",
        type=int,
        default=6,
        help="heads timed with the one-head-per-forward reference (extrapolated)",
    )
    parser.add_argument("--skip-exact", action="store_true", help="only attribution and reference")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's choice). On a machine shared "
        "with other busy processes, 1 thread is several times faster than 2",
    )
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = headclass.load_model(args.model, backend=args.backend)
    load_s = time.perf_counter() - t0
    n_heads = model.n_layers * model.n_heads
    if args.probe == "induction":
        probe = probes.repeated(model, args.sequences, args.tokens // 2, seed=0)
        targets = induction_targets(probe.tokens)
    else:
        probe = probes.text(model, max_tokens=args.tokens + 1, n_sequences=args.sequences)
        targets = None
    tokens = probe.tokens
    print(
        f"{model!r} on {model.backend}; probe {args.probe} {tuple(tokens.shape)}, method {args.method}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
        f"load {load_s:.1f}s; {_load()}",
        flush=True,
    )
    result = {
        "model": model.name,
        "backend": model.backend,
        "probe": args.probe,
        "tokens": list(tokens.shape),
        "method": args.method,
        "n_heads": n_heads,
        "threads": torch.get_num_threads(),
    }

    # Attribution first: it is quick, and a warm-up of the same code paths.
    t0 = time.perf_counter()
    approx = ablation_dloss(model, tokens, targets=targets, method=args.method, mode="attribution")
    result["attribution_s"] = time.perf_counter() - t0
    print(f"attribution patching, {n_heads} heads: {result['attribution_s']:.1f}s ({_load()})", flush=True)

    # Reference on a spread of heads, extrapolated.
    step = max(1, n_heads // max(1, args.reference_heads))
    subset = [divmod(i, model.n_heads) for i in range(0, n_heads, step)][: args.reference_heads]
    t0 = time.perf_counter()
    ref = ablation_dloss_reference(model, tokens, targets=targets, method=args.method, heads=subset)
    ref_s = time.perf_counter() - t0
    # The reference also runs one clean pass; per head it is one full forward.
    per_head = ref_s / (len(subset) + 1)
    result.update(reference_heads=len(subset), reference_s=ref_s, reference_extrapolated_s=per_head * (n_heads + 1))
    print(
        f"reference, {len(subset)} heads: {ref_s:.1f}s -> extrapolated to {n_heads} heads: "
        f"{result['reference_extrapolated_s']:.0f}s ({_load()})",
        flush=True,
    )

    if not args.skip_exact:
        t0 = time.perf_counter()
        exact = ablation_dloss(model, tokens, targets=targets, method=args.method, progress=True)
        result["exact_s"] = time.perf_counter() - t0
        agree = float((exact[tuple(zip(*subset))] - ref[tuple(zip(*subset))]).abs().max())
        result.update(
            exact_vs_reference_max_abs_diff=agree,
            speedup_vs_reference=result["reference_extrapolated_s"] / result["exact_s"],
            spearman_attribution_vs_exact=rank_correlation(exact, approx),
            exact_top5=[
                [*divmod(int(i), model.n_heads), float(exact.flatten()[i])]
                for i in torch.argsort(exact.flatten(), descending=True)[:5]
            ],
            attribution_top5=[
                [*divmod(int(i), model.n_heads), float(approx.flatten()[i])]
                for i in torch.argsort(approx.flatten(), descending=True)[:5]
            ],
        )
        top = set(map(tuple, (h[:2] for h in result["exact_top5"])))
        result["top5_overlap"] = len(top & set(map(tuple, (h[:2] for h in result["attribution_top5"]))))
        print(
            f"exact, {n_heads} heads: {result['exact_s']:.1f}s ({_load()}); "
            f"speed-up over reference (extrapolated) x{result['speedup_vs_reference']:.1f}; "
            f"max |exact - reference| on the subset {agree:.1e}",
            flush=True,
        )
        print(
            f"Spearman(attribution, exact) = {result['spearman_attribution_vs_exact']:.3f}; "
            f"top-5 overlap {result['top5_overlap']}/5",
            flush=True,
        )
        print("exact top 5 (layer, head, dloss):", result["exact_top5"])
        print("attribution top 5:", result["attribution_top5"])
    result["load_avg_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
