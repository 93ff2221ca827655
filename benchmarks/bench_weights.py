"""Benchmark the weight-based scores on a GPT-2-XL-shaped model with random weights.

Usage::

    python benchmarks/bench_weights.py                       # GPT-2 XL shape (48 x 25, d 1600)
    python benchmarks/bench_weights.py --topk-layers 48      # the top-k sample on every layer
    python benchmarks/bench_weights.py --layers 12 --heads 12 --d-model 768   # GPT-2 small shape
    python benchmarks/bench_weights.py --weights-only   # processed weights only, no TL model
    python benchmarks/bench_weights.py --threads 1      # on a machine shared with other jobs

Phases, each timed on its own (model building and loading are not timed):

1. ``weights``: first access of the processed per-head weights (the TransformerLens bridge
   stacks them from its modules; HeadModel caches them). Part of loading, reported apart.
2. ``per-head scores`` (the figure with the 60 s budget): the eigenvalue copying score, the SVD
   summary (identity / projection distances, norms, effective ranks) and the positional QK
   signature: ``copy_eigen_score(ov_circuit_eigenvalues(model))``, ``ov_svd_scores(model)``,
   ``positional_prev_token_score(model)``.
3. ``top-k copy``: :func:`topk_copy_scores` with the default 2000 sampled tokens, on the first
   ``--topk-layers`` layers (default 4; the time for all layers is extrapolated linearly, as
   every layer costs the same, and printed as such).
4. ``composition``: the full Q, K and V composition tensors, ``[48, 25, 48, 25]`` each.

Memory: the resident set size is sampled every 20 ms by a thread; the report gives the model's
weight bytes (every parameter of the TransformerLens model), the RSS before each phase and the
peak during it.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the RSS in a thread while the block runs."""

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def build_model(args):
    """Random GPT-2 of the requested shape, saved to a temporary folder and loaded from it
    (loading from disk avoids holding the Hugging Face model and its copy at once)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import headclass

    folder = tempfile.mkdtemp(prefix="bench-weights-")
    try:
        torch.manual_seed(0)
        config = GPT2Config(
            n_layer=args.layers,
            n_head=args.heads,
            n_embd=args.d_model,
            vocab_size=args.vocab,
            n_positions=args.n_ctx,
            bos_token_id=0,
            eos_token_id=0,
        )
        hf = GPT2LMHeadModel(config)
        hf.save_pretrained(folder)
        del hf
        gc.collect()
        model = headclass.load_model(folder, name=f"random GPT-2 {args.layers}x{args.heads} d{args.d_model}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    gc.collect()
    return model


def build_weights_only(args) -> SimpleNamespace:
    """The processed weights the scores read, random, without a TransformerLens model.

    For machines where a full model of this shape does not fit twice over: W_Q, W_K, W_V, W_O,
    W_E, W_U and W_pos only (no MLPs), scaled like GPT-2's initialisation.
    """
    g = torch.Generator().manual_seed(0)
    L, H, d, V = args.layers, args.heads, args.d_model, args.vocab
    r = d // H

    def rand(*shape):
        return torch.randn(*shape, generator=g).mul_(0.02)

    W_E = rand(V, d)
    return SimpleNamespace(
        name=f"random weights {L}x{H} d{d}",
        n_layers=L,
        n_heads=H,
        d_model=d,
        d_head=r,
        d_vocab=V,
        tokenizer=None,
        special_token_ids=lambda: {0},
        W_Q=rand(L, H, d, r),
        W_K=rand(L, H, d, r),
        W_V=rand(L, H, d, r),
        W_O=rand(L, H, r, d),
        W_E=W_E,
        W_U=W_E.T.contiguous(),
        W_pos=rand(args.n_ctx, d),
    )


def first_layers(model, n_layers: int) -> SimpleNamespace:
    """A view of the model's first layers (the top-k scores read only these attributes)."""
    return SimpleNamespace(
        name=model.name,
        n_layers=n_layers,
        n_heads=model.n_heads,
        d_model=model.d_model,
        d_head=model.d_head,
        d_vocab=model.d_vocab,
        tokenizer=None,
        special_token_ids=model.special_token_ids,
        W_V=model.W_V[:n_layers],
        W_O=model.W_O[:n_layers],
        W_E=model.W_E,
        W_U=model.W_U,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--heads", type=int, default=25)
    parser.add_argument("--d-model", type=int, default=1600)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--topk-layers", type=int, default=4, help="layers for the top-k sample (0: skip)")
    parser.add_argument("--topk-sample", type=int, default=2000)
    parser.add_argument("--skip-composition", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--weights-only",
        action="store_true",
        help="random processed weights without a TransformerLens model (less memory)",
    )
    args = parser.parse_args(argv)

    from headclass.scores.composition import composition_scores
    from headclass.scores.weights import (
        copy_eigen_score,
        ov_circuit_eigenvalues,
        ov_svd_scores,
        positional_prev_token_score,
        topk_copy_scores,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    t0 = time.perf_counter()
    if args.weights_only:
        model = build_weights_only(args)
        n_weights = sum(v.numel() * v.element_size() for v in vars(model).values() if isinstance(v, torch.Tensor))
    else:
        model = build_model(args)
        n_weights = sum(p.numel() * p.element_size() for p in model.tl_model.parameters())
    print(
        f"model: {model.name!r}: {model.n_layers} layers x {model.n_heads} heads, d_model {model.d_model}, "
        f"d_head {model.d_head}, vocab {model.d_vocab}"
    )
    print(
        f"built and loaded in {time.perf_counter() - t0:.1f} s (not counted); "
        f"weights {gib(n_weights)}; RSS after loading {gib(rss_bytes())}"
    )

    def report(name, probe, extra=""):
        print(
            f"{name:<16} {probe.seconds:8.1f} s   RSS {gib(probe.start)} -> peak {gib(probe.peak)} "
            f"({probe.peak / n_weights:.2f}x weights) {extra}",
            flush=True,
        )

    with PeakRSS() as probe:
        for key in ("W_Q", "W_K", "W_V", "W_O", "W_E", "W_U", "W_pos"):
            getattr(model, key)
    report("weights", probe)

    with PeakRSS() as probe:
        eigen = copy_eigen_score(ov_circuit_eigenvalues(model))
        t_eig = time.perf_counter() - probe.t0
        svd = ov_svd_scores(model)
        t_svd = time.perf_counter() - probe.t0 - t_eig
        positional = positional_prev_token_score(model)
        t_pos = time.perf_counter() - probe.t0 - t_eig - t_svd
    report(
        "per-head scores",
        probe,
        f"[eigen {t_eig:.1f} s, svd {t_svd:.1f} s, positional {t_pos:.1f} s; "
        f"{len(svd) + 2} keys, all finite: "
        f"{bool(torch.isfinite(eigen).all() and torch.isfinite(positional).all())}]",
    )

    if args.topk_layers > 0:
        n = min(args.topk_layers, model.n_layers)
        with PeakRSS() as probe:
            topk_copy_scores(first_layers(model, n), sample_size=args.topk_sample)
        full = probe.seconds * model.n_layers / n
        report(
            f"top-k ({n} layers)",
            probe,
            f"[{args.topk_sample} tokens; all {model.n_layers} layers: "
            f"{'measured' if n == model.n_layers else 'extrapolated'} {full:.0f} s]",
        )

    if not args.skip_composition:
        with PeakRSS() as probe:
            scores = composition_scores(model, progress=False)
        report("composition", probe, f"[q, k, v: {tuple(scores['k'].shape)} each]")

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\nmodel weights {gib(n_weights)}; process peak RSS (ru_maxrss, loading included) {gib(peak)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
