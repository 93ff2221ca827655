"""Benchmark the sweep executors: Ray with 2 workers vs the local executor, on 6 toy models.

Usage::

    python benchmarks/bench_sweep.py                 # 6 toy models, 2 Ray workers
    python benchmarks/bench_sweep.py --models 4 --repeats 1
    python benchmarks/bench_sweep.py --sequences 16  # lighter probes: less work per model

The models are toy transformers (:mod:`headclass.toy`, 2-4 layers x 4 heads, d_model 128,
128-token context, 300 training steps, seeds 0-5), trained once into the per-user cache (not
timed). Each is classified with probes that fill its context (``--sequences`` sequences of
2 x 60 repeated tokens and of 128 text tokens), so one model is a few seconds of work, as a
small real model would be, rather than the fraction of a second the 32-token toys take.

Runs, each into a fresh output folder (so nothing is skipped), each timed end to end:

1. ``local, 1 thread``: ``headclass.sweep(..., executor="local")``, ``num_cpus: 1``;
2. ``local, 2 threads``: the same with ``num_cpus: 2`` (torch uses both cores in one process;
   run once whatever ``--repeats``: on a busy 2-core machine torch's two threads wait on each
   other and this takes minutes);
3. ``ray, cold``: ``executor="ray"`` with no Ray running: the sweep starts a local Ray instance
   (all CPUs: 2 here), runs one task per model (``num_cpus: 1``: two workers at once) and
   stops it; the time includes starting Ray and the workers' imports;
4. ``ray, warm``: a Ray instance (2 CPUs) already started in this process, workers already
   imported (one throw-away sweep first): the steady state of a long sweep.

Speed-ups are against run 1. Peak memory per worker is each process' ``ru_maxrss`` as the
sweep reports it (``SweepResult.models["peak_rss_mb"]``, by pid); for the local runs, this
process. The machine's ``uptime`` load is printed before and after: on a shared machine, the
figures move with the load.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time


def toy_sources(n_models: int) -> list[dict]:
    from headclass.toy import toy_model

    models = []
    for i in range(n_models):
        n_layers = 2 + i % 3
        folder = toy_model(n_layers, n_heads=4, d_model=128, seq_len=128, steps=300, seed=i, progress=False)
        models.append({"source": str(folder), "name": f"toy-{n_layers}l-s{i}"})
    return models


def spec_for(models: list[dict], sequences: int, num_cpus: int) -> dict:
    config = {
        "probes": {
            "repeated": {"segment_length": 60, "n_sequences": sequences},
            "text": {"max_tokens": 128, "n_sequences": sequences},
        }
    }
    return {"models": models, "config": config, "num_cpus": num_cpus}


def timed(spec: dict, executor: str) -> tuple[float, object]:
    import headclass

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as out:
        started = time.perf_counter()
        result = headclass.sweep(spec, out=out, executor=executor, progress=False)
        seconds = time.perf_counter() - started
    if not result.ok:
        raise SystemExit(f"sweep failed: {result.failures}")
    return seconds, result


def peaks(result) -> dict[int, float]:
    out: dict[int, float] = {}
    for pid, mb in zip(result.models["pid"], result.models["peak_rss_mb"]):
        out[int(pid)] = max(out.get(int(pid), 0.0), float(mb))
    return out


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--sequences", type=int, default=64, help="probe sequences per probe (default 64)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant; the median is reported")
    parser.add_argument("--skip-two-threads", action="store_true", help="leave out run 2 (local, 2 threads)")
    args = parser.parse_args()

    from headclass.sweep.executors import local_ray

    print(f"load before: {uptime()}")
    models = toy_sources(args.models)
    one, two = spec_for(models, args.sequences, 1), spec_for(models, args.sequences, 2)
    timed(spec_for(models[:1], args.sequences, 1), "local")  # warm the imports of this process

    rows = []
    variants = [
        ("local, 1 thread", one, "local"),
        ("local, 2 threads", two, "local"),
        ("ray, cold (starts Ray)", one, "ray"),
    ]
    if args.skip_two_threads:
        variants.pop(1)
    for label, spec, executor in variants:
        repeats = 1 if spec is two else args.repeats  # minutes on a busy machine: once is enough
        runs = [timed(spec, executor) for _ in range(repeats)]
        rows.append((label, [s for s, _ in runs], runs[-1][1]))
        print(f"  {label}: {', '.join(f'{s:.1f}' for s, _ in runs)} s", flush=True)
    with local_ray(num_cpus=2):
        timed(spec_for(models[:2], args.sequences, 1), "ray")  # start and warm both workers
        runs = [timed(one, "ray") for _ in range(args.repeats)]
        rows.append(("ray, warm (Ray up)", [s for s, _ in runs], runs[-1][1]))
        print(f"  ray, warm (Ray up): {', '.join(f'{s:.1f}' for s, _ in runs)} s", flush=True)
    print(f"load after:  {uptime()}")

    base = statistics.median(rows[0][1])
    work = rows[0][2].models["seconds"].sum()
    print(
        f"\n{args.models} toy models, {args.sequences} probe sequences; model work (local, 1 thread) "
        f"{work:.1f} s in all"
    )
    print(f"{'run':<24} {'wall s (median)':>15} {'speed-up':>9}  peak RSS per process (MiB)")
    for label, seconds, result in rows:
        median = statistics.median(seconds)
        memory = ", ".join(f"{mb:.0f}" for mb in sorted(peaks(result).values()))
        print(f"{label:<24} {median:>15.1f} {base / median:>8.2f}x  {memory}")


if __name__ == "__main__":
    main()
