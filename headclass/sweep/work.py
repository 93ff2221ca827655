"""The work of one source: load, classify, measure the in-context loss; the same in every executor.

:func:`run_job` runs in the driver (local executor) or in a Ray worker, and returns plain data
(a :class:`PartResult` holding the head table and facts) that the driver writes. An error of
the source itself (a bad name, an unreadable folder, a probe that does not fit) is caught and
returned as a failure, so Ray never retries it; only a lost worker (a crash, a kill, a lost
node) makes Ray run the job again.
"""

from __future__ import annotations

import gc
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional

import pandas as pd

from headclass.sweep.spec import Job

__all__ = ["PartResult", "run_job", "peak_rss_mb", "one_line"]


@dataclass
class PartResult:
    """What a worker sends back for one source: a table and metadata, or an error."""

    ok: bool
    seconds: float
    pid: int
    host: str
    peak_rss_mb: float
    table: Optional[pd.DataFrame] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    n_params: Optional[int] = None
    in_context_loss: Optional[float] = None
    error_type: Optional[str] = None
    error: Optional[str] = None
    traceback: Optional[str] = None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss``)."""
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 1024.0 if platform.system() != "Darwin" else rss / 2**20
    except (ImportError, OSError):  # pragma: no cover - Windows
        return float("nan")


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(exc).__name__


def run_job(job: Job) -> PartResult:
    """Load ``job.source``, classify it with ``job.config``, free it; errors become a failure.

    Torch uses ``job.threads`` threads meanwhile (restored after), in every executor, so the
    local and the Ray executor compute identical tables.
    """
    import torch

    started = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    model = None
    try:
        from headclass.loading import load_model
        from headclass.taxonomy import classify
        from headclass.toy import in_context_loss

        kwargs: dict[str, Any] = {"device": job.device, "dtype": job.dtype, "backend": job.backend, "name": job.name}
        if job.revision is not None:
            kwargs["revision"] = job.revision
        model = load_model(job.source, **kwargs)
        taxonomy = classify(model, job.config, ablation=job.ablation, progress=False)
        icl = in_context_loss(model, job.config)
        n_params = int(model.n_params)
        result = PartResult(
            ok=True,
            seconds=0.0,
            pid=os.getpid(),
            host=platform.node(),
            peak_rss_mb=0.0,
            table=taxonomy.table,
            metadata=taxonomy.metadata,
            n_params=n_params,
            in_context_loss=icl,
        )
    except Exception as exc:  # the source's own error: reported, never retried
        result = PartResult(
            ok=False,
            seconds=0.0,
            pid=os.getpid(),
            host=platform.node(),
            peak_rss_mb=0.0,
            error_type=type(exc).__name__,
            error=one_line(exc),
            traceback=traceback.format_exc(),
        )
    finally:
        del model
        gc.collect()
        torch.set_num_threads(before)
    result.seconds = time.perf_counter() - started
    result.peak_rss_mb = peak_rss_mb()
    return result
