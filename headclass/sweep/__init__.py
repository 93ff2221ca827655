"""Sweeps: classify many models and training checkpoints, locally or on a Ray cluster, resumably.

:func:`sweep` reads a spec (see :mod:`headclass.sweep.spec`), classifies every source with
one executor (:mod:`headclass.sweep.executors`: ``local``, sequential, one model in memory
at a time; or ``ray``, one task per source on a cluster), and writes into ``out``:

==========================  ==================================================================
``parts/<stem>.parquet``    one source's taxonomy (``headclass.report.export.read_parquet``)
``parts/<stem>.json``       its facts and the hash of source + config it was computed from
``sweep.parquet``           every finished source's heads in one tidy table (below)
``sweep.html``              the comparison report (:mod:`headclass.sweep.report`)
``summary.json``            one record per source: status, times, memory, error
``failures.json``           the sources that failed, with their error (``[]`` if none)
==========================  ==================================================================

The driver writes every file, each atomically. A part whose hash matches (same source, same
folder content, same config and options) is reused on the next run, so an interrupted or
partly failed sweep picks up where it stopped; a failing source is recorded and the others
finish.

The merged table: ``model``, ``source``, ``revision``, ``step`` (Int64, training step or
<NA>), ``series`` and ``family`` (grouping for the report, or None), ``n_params``,
``in_context_loss`` (nats, loss on the second repeat of the repeated probe minus the first;
:func:`headclass.toy.in_context_loss`), then every column of the taxonomy table (``layer``,
``head``, ``relative_depth``, labels, scores...), in spec order.

Note: ``headclass.sweep`` at the top level is this function; import the module's other names
from their submodules (``from headclass.sweep.spec import load_spec``).

Examples
--------
>>> import headclass
>>> result = headclass.sweep("sweep.yaml", out="sweep-out")              # local
>>> result = headclass.sweep("sweep.yaml", out="sweep-out", executor="ray", address="auto")
>>> result.table.groupby("model")["induction"].max()
>>> result.failures
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import pandas as pd

from headclass.errors import HeadclassError
from headclass.sweep.spec import Job, SweepSpec, SweepSpecError, load_spec, plan
from headclass.sweep.work import PartResult

__all__ = ["sweep", "SweepResult", "SweepSpec", "SweepSpecError", "load_spec"]

#: Columns put before the taxonomy's own (``model`` is the taxonomy's first column).
SWEEP_COLUMNS = ("model", "source", "revision", "step", "series", "family", "n_params", "in_context_loss")


@dataclass
class SweepResult:
    """What :func:`sweep` wrote and found.

    Attributes
    ----------
    table
        The merged head table of every finished source (as in ``sweep.parquet``).
    models
        One row per source in spec order: ``name``, ``status`` (``done``, ``skipped``: reused
        from an earlier run, ``failed``), ``source``, ``revision``, ``step``, ``n_params``,
        ``in_context_loss``, ``seconds`` (of this run's work; NaN when skipped), ``peak_rss_mb``
        (of the process that did it), ``pid``, ``error``.
    failures
        The failed sources (``name``, ``source``, ``revision``, ``error_type``, ``error``,
        ``traceback``), as in ``failures.json``.
    out
        The output folder.
    seconds
        Wall time of the whole sweep.
    """

    table: pd.DataFrame
    models: pd.DataFrame
    failures: list[dict[str, Any]]
    out: Path
    seconds: float
    taxonomies: list[Any] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        """True when no source failed."""
        return not self.failures

    def counts(self) -> dict[str, int]:
        """Sources per status: ``done``, ``skipped``, ``failed``."""
        return {s: int((self.models["status"] == s).sum()) for s in ("done", "skipped", "failed")}

    def training_curves(self) -> pd.DataFrame:
        """Best induction / previous-token score and in-context loss per checkpoint
        (:func:`headclass.sweep.report.training_curves`)."""
        from headclass.sweep.report import training_curves

        return training_curves(self.table)

    def summary_line(self) -> str:
        c = self.counts()
        done = self.models.loc[self.models["status"] == "done", "seconds"].sum()
        return (
            f"sweep: {c['done']} done, {c['failed']} failed, {c['skipped']} skipped "
            f"in {self.seconds:.1f} s (model time {done:.1f} s); results in {self.out}"
        )

    def __repr__(self) -> str:
        return f"SweepResult({self.summary_line()})"


def sweep(
    spec: Union[str, os.PathLike, Mapping[str, Any], SweepSpec],
    *,
    out: Union[str, os.PathLike],
    executor: str = "local",
    address: Optional[str] = None,
    progress: bool = True,
) -> SweepResult:
    """Classify every source of ``spec``, merge the tables and write the report into ``out``.

    Parameters
    ----------
    spec
        A YAML path, a mapping or a :class:`~headclass.sweep.spec.SweepSpec`.
    out
        Output folder (created). Parts already there whose hash matches are reused.
    executor
        ``"local"`` (default: sequential, in this process) or ``"ray"`` (one task per source;
        needs ``pip install "headclass[ray]"``).
    address
        Ray cluster to join (``"auto"``, ``"host:6379"``, ``"ray://host:10001"``); default
        ``$RAY_ADDRESS``; with neither a local Ray instance is started for the run. Only
        with ``executor="ray"``.
    progress
        One bar for the sweep (on a terminal) and a status line per source, on stderr.

    Returns
    -------
    SweepResult
        Check :attr:`SweepResult.ok`: a failing source does not raise, it is recorded in
        ``failures`` (and ``failures.json``) while the others finish.

    Raises
    ------
    SweepSpecError
        The spec or a source's config is invalid (nothing is run).
    HeadclassError
        An unknown executor, or ``address`` with the local executor.
    """
    from headclass.sweep.executors import EXECUTORS

    started = time.perf_counter()
    if executor not in EXECUTORS:
        raise HeadclassError(f"The 'executor' parameter must be one of {sorted(EXECUTORS)}. Got {executor!r}.")
    if address is not None and executor != "ray":
        raise HeadclassError(f"address {address!r} is for the ray executor; add executor='ray' (--executor ray).")
    valid, base = load_spec(spec)
    jobs = plan(valid, base)
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise HeadclassError(f"out {str(out_dir)!r} exists and is not a folder.")
    parts = out_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)

    status = _Progress(len(jobs), progress)
    records: dict[int, dict[str, Any]] = {}
    todo = []
    for job in jobs:
        facts = _finished_part(parts, job)
        if facts is None:
            todo.append(job)
        else:
            records[job.index] = {**facts, "status": "skipped", "seconds": float("nan")}
            status.line(job, "skipped (unchanged since the last run)")
    failures: list[dict[str, Any]] = []
    try:
        kwargs = {"address": address, "on_start": status.note} if executor == "ray" else {}
        # closing: an error here (say, a full disk) stops the executor at once (Ray: cancels
        # the tasks left and stops a Ray instance started for the run), not at interpreter exit.
        with contextlib.closing(EXECUTORS[executor](todo, valid, **kwargs)) as results:  # type: ignore[type-var]
            for job, part in results:
                if part.ok:
                    records[job.index] = _write_part(parts, job, part)
                    records[job.index]["status"] = "done"
                    status.line(job, f"done in {part.seconds:.1f} s (pid {part.pid}, peak {part.peak_rss_mb:.0f} MiB)")
                else:
                    failure = {
                        **job.record(),
                        "error_type": part.error_type,
                        "error": part.error,
                        "traceback": part.traceback,
                        "seconds": part.seconds,
                    }
                    failures.append(failure)
                    records[job.index] = {
                        **job.record(),
                        "status": "failed",
                        "seconds": part.seconds,
                        "error": f"{part.error_type}: {part.error}",
                        "pid": part.pid,
                    }
                    status.line(job, f"FAILED: {part.error_type}: {part.error}")
    finally:
        status.close()

    failures.sort(key=lambda f: [j.name for j in jobs].index(f["name"]))
    table, taxonomies = _merge(parts, jobs, records)
    models = _models_table(jobs, records)
    from headclass.atomic import atomic_write, write_text
    from headclass.sweep.report import write_report

    atomic_write(out_dir / "sweep.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    table = pd.read_parquet(out_dir / "sweep.parquet")  # exactly what a reader of the file gets
    write_text(out_dir / "failures.json", _dumps(failures))
    write_text(out_dir / "summary.json", _dumps({"executor": executor, "models": models.to_dict(orient="records")}))
    write_report(
        out_dir / "sweep.html",
        table=table,
        models=models,
        taxonomies=taxonomies,
        failures=failures,
        n_bins=valid.n_bins,
    )
    result = SweepResult(
        table=table,
        models=models,
        failures=failures,
        out=out_dir,
        seconds=time.perf_counter() - started,
        taxonomies=taxonomies,
    )
    if progress:
        print(f"headclass: {result.summary_line()}", file=sys.stderr, flush=True)
    return result


# -- parts -----------------------------------------------------------------------------------------


def _finished_part(parts: Path, job: Job) -> Optional[dict[str, Any]]:
    """The sidecar facts of a finished part computed from the same inputs, else None."""
    sidecar, data = parts / f"{job.stem}.json", parts / f"{job.stem}.parquet"
    if not (sidecar.is_file() and data.is_file()):
        return None
    try:
        facts = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return facts if facts.get("key") == job.key else None


def _write_part(parts: Path, job: Job, result: PartResult) -> dict[str, Any]:
    """Parquet first, then the sidecar: a sidecar names only a part that is completely written."""
    from headclass.atomic import write_text
    from headclass.taxonomy import HeadTaxonomy

    facts = {
        **job.record(),
        "n_params": result.n_params,
        "in_context_loss": result.in_context_loss,
        "seconds": result.seconds,
        "pid": result.pid,
        "host": result.host,
        "peak_rss_mb": result.peak_rss_mb,
    }
    metadata = {**result.metadata, "sweep": facts}
    HeadTaxonomy(result.table, metadata).to_parquet(parts / f"{job.stem}.parquet")
    write_text(parts / f"{job.stem}.json", _dumps(facts))
    return dict(facts)


def _merge(parts: Path, jobs: list[Job], records: Mapping[int, dict[str, Any]]) -> tuple[pd.DataFrame, list[Any]]:
    """The merged table, read back from the parts (the same bytes whether computed now or before)."""
    from headclass.report.export import read_parquet

    frames, taxonomies = [], []
    for job in jobs:
        record = records.get(job.index)
        if record is None or record["status"] == "failed":
            continue
        taxonomy = read_parquet(parts / f"{job.stem}.parquet")
        taxonomies.append(taxonomy)
        heads = taxonomy.table
        front = pd.DataFrame(
            {
                "model": heads["model"].astype(str),
                "source": job.source,
                "revision": pd.Series([job.revision] * len(heads), dtype="object"),
                "step": pd.array([job.step] * len(heads), dtype="Int64"),
                "series": pd.Series([job.series] * len(heads), dtype="object"),
                "family": pd.Series([job.family] * len(heads), dtype="object"),
                "n_params": pd.array([record.get("n_params")] * len(heads), dtype="Int64"),
                "in_context_loss": float(record["in_context_loss"])
                if record.get("in_context_loss") is not None
                else math.nan,
            },
            index=heads.index,
        )
        frames.append(pd.concat([front, heads.drop(columns=["model"])], axis=1))
    if not frames:
        return pd.DataFrame(columns=list(SWEEP_COLUMNS)), taxonomies
    return pd.concat(frames, ignore_index=True), taxonomies


def _models_table(jobs: list[Job], records: Mapping[int, dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for job in jobs:
        r = records.get(job.index, {"status": "failed", "error": "not run"})
        rows.append(
            {
                "name": job.name,
                "status": r["status"],
                "source": job.source,
                "revision": job.revision,
                "step": job.step,
                "n_params": r.get("n_params"),
                "in_context_loss": r.get("in_context_loss"),
                "seconds": r.get("seconds"),
                "peak_rss_mb": r.get("peak_rss_mb"),
                "pid": r.get("pid"),
                "error": r.get("error"),
            }
        )
    models = pd.DataFrame(rows)
    for column in ("step", "n_params", "pid"):
        models[column] = pd.array(models[column].tolist(), dtype="Int64")
    return models


def _plain(value: Any) -> Any:
    """JSON-able: NaN and <NA> become null, numpy scalars Python ones."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(_plain(value), indent=2, allow_nan=False) + "\n"


class _Progress:
    """One tqdm bar for the sweep (on a terminal) and a status line per source, on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.total = total
        self.count = 0
        self.bar = None
        if enabled and _stderr_is_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="sweep", unit="model", file=sys.stderr)

    def note(self, text: str) -> None:
        self._write(f"headclass: {text}")

    def line(self, job: Job, text: str) -> None:
        self.count += 1
        self._write(f"headclass: [{self.count}/{self.total}] {job.name}: {text}")
        if self.bar is not None:
            self.bar.update(1)

    def _write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
