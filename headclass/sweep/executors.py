"""Executors: run jobs and yield ``(job, result)`` as each finishes; the driver writes the parts.

* :func:`run_local` -- sequential, in this process, one model in memory at a time.
* :func:`run_ray` -- one Ray task per source. ``ray.init(address=...)`` joins the cluster at
  ``address`` (or ``$RAY_ADDRESS``); a Ray connection this process already has is used as it
  is; with neither, a local instance is started for the run (:func:`local_ray`: bound to
  127.0.0.1, no dashboard) and stopped after. Each task declares ``num_cpus``, ``memory`` (estimated from
  the model's size and dtype, see :func:`estimate_memory`) and ``num_gpus`` (when the device
  is cuda). A task whose worker dies is rerun up to ``max_retries`` times; a source that
  fails by itself comes back as a failure and is not rerun (``retry_exceptions=False``).

Ray is imported here only, inside :func:`run_ray`: ``pip install "headclass[ray]"``. On a
cluster, every node needs headclass and its dependencies installed (the same versions as the
driver): the tasks import it there.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from headclass.errors import MissingDependencyError
from headclass.loading.sources import safetensors_header
from headclass.sweep.spec import Job, SweepSpec
from headclass.sweep.work import PartResult, one_line, run_job

__all__ = ["EXECUTORS", "run_local", "run_ray", "local_ray", "estimate_memory", "estimate_params"]

_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
_SIZE = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([mMbB])(?![A-Za-z])")
_SAFETENSORS_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
#: What a worker holds besides the model: Python, torch, TransformerLens, probes, buffers.
BASE_MEMORY = int(1.5 * 2**30)
#: Copies of the weights alive at the peak: the Hugging Face model, TransformerLens' processed
#: weights, and the head model's expanded and folded views.
WEIGHT_COPIES = 3


def run_local(jobs: Sequence[Job], spec: SweepSpec, **_: Any) -> Iterator[tuple[Job, PartResult]]:
    """Run each job in turn in this process."""
    for job in jobs:
        yield job, run_job(job)


def estimate_params(job: Job) -> Optional[int]:
    """Parameter count: exact from a local folder's safetensors headers, else from a size in the
    name (``-135m``, ``0.5b``), else ``None``."""
    path = Path(job.source)
    if path.is_dir():
        total = 0
        for file in sorted(path.glob("*.safetensors")):
            for info in safetensors_header(file)[0].values():
                count = 1
                for dim in info["shape"]:
                    count *= int(dim)
                total += count
        if total:
            return total
        weights = sum(p.stat().st_size for p in path.glob("*.bin"))
        return weights // 4 if weights else None
    if path.is_file():
        return path.stat().st_size // 2  # a quantised GGUF holds ~0.5-2 bytes per weight
    match = _SIZE.search(job.name) or _SIZE.search(job.source)
    if match:
        return int(float(match.group(1)) * (1e6 if match.group(2).lower() == "m" else 1e9))
    return None


def estimate_memory(job: Job, spec: SweepSpec) -> int:
    """Bytes a task reserves: ``spec.memory_gb`` if given, else a base for the runtime plus
    :data:`WEIGHT_COPIES` copies of the weights at ``spec.dtype`` (1e9 parameters assumed when
    the size cannot be told)."""
    if spec.memory_gb is not None:
        return int(spec.memory_gb * 2**30)
    params = estimate_params(job) or 10**9
    return BASE_MEMORY + WEIGHT_COPIES * params * _BYTES[spec.dtype]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependencyError('the ray executor needs Ray: pip install "headclass[ray]".') from None
    return ray


def run_ray(
    jobs: Sequence[Job],
    spec: SweepSpec,
    *,
    address: Optional[str] = None,
    on_start: Optional[Callable[[str], None]] = None,
) -> Iterator[tuple[Job, PartResult]]:
    """Run one Ray task per job; yield results in the order they finish (no jobs: no Ray)."""
    if not jobs:
        return
    ray = _import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    with contextlib.ExitStack() as stack:
        if ray.is_initialized():  # the caller's connection: used as it is, and left open
            where = "using the Ray instance this process is already connected to"
        elif address is not None:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            stack.callback(ray.shutdown)  # disconnect after; the cluster itself keeps running
            where = f"joined the Ray cluster at {address}"
        else:
            stack.enter_context(local_ray())
            where = "started a local Ray instance for this run (127.0.0.1 only)"
        yield from _run_tasks(ray, jobs, spec, lambda text: on_start(text) if on_start else None, where)


def _run_tasks(
    ray: Any, jobs: Sequence[Job], spec: SweepSpec, note: Callable[[str], None], where: str
) -> Iterator[tuple[Job, PartResult]]:
    note(f"{where} ({ray.cluster_resources().get('CPU', 0):g} CPUs)")
    pending: dict[Any, Job] = {}
    try:
        remote = ray.remote(run_job)
        gpus = spec.num_gpus if spec.num_gpus is not None else (1 if spec.device.startswith("cuda") else 0)
        largest = _largest_node_memory(ray)
        for job in jobs:
            memory = estimate_memory(job, spec)
            if largest and memory > largest:  # would wait forever for a node that big
                note(
                    f"{job.name}: estimated {memory / 2**30:.1f} GiB, more than the largest node's "
                    f"{largest / 2**30:.1f} GiB; reserving that instead (set memory_gb to override)"
                )
                memory = largest
            task = remote.options(
                num_cpus=spec.num_cpus,
                num_gpus=gpus,
                memory=memory,
                max_retries=spec.max_retries,
                retry_exceptions=False,
                name=f"headclass:{job.stem}",
            )
            pending[task.remote(job)] = job
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # worker lost more than max_retries times, or a Ray error
                    result = PartResult(
                        ok=False,
                        seconds=float("nan"),
                        pid=-1,
                        host="",
                        peak_rss_mb=float("nan"),
                        error_type=type(exc).__name__,
                        error=one_line(exc).split(" Traceback")[0],
                    )
                yield job, result
    finally:
        for ref in pending:  # left only when the driver stops early (an error, Ctrl-C)
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)


@contextlib.contextmanager
def local_ray(num_cpus: Optional[int] = None) -> Iterator[Any]:
    """A Ray instance on this machine only, for the block: no dashboard, every server on 127.0.0.1,
    workers at normal priority.

    On Linux Ray advertises and binds the machine's network address even for a one-machine
    instance (``_node_ip_address="127.0.0.1"`` is turned back into it); its single-machine mode,
    the default on macOS and Windows, uses the loopback address. That mode is switched on for
    the block (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which Ray reads when it is imported, and
    the constant it set, for a Ray already imported) and restored after ``ray.shutdown()``.
    """
    ray = _import_ray()
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    saved_constant = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    saved_env = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if saved_constant is not None and constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        # worker_niceness 0: Ray runs workers at nice 15 by default, which on a busy machine
        # leaves them a fraction of the CPU the same work gets in a normal process.
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            _node_ip_address="127.0.0.1",
            _system_config={"worker_niceness": 0},
        )
        try:
            yield ray
        finally:
            ray.shutdown()
    finally:
        if saved_constant is not None and constants is not None:
            constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved_env


def _largest_node_memory(ray: Any) -> int:
    """The ``memory`` resource of the cluster's largest alive node, in bytes (0 if unknown)."""
    try:
        return int(max(node["Resources"].get("memory", 0) for node in ray.nodes() if node.get("Alive")))
    except (ValueError, KeyError, TypeError):
        return 0


#: Executor name -> function ``(jobs, spec, address=...) -> iterator of (job, result)``.
EXECUTORS: dict[str, Callable[..., Iterator[tuple[Job, PartResult]]]] = {"local": run_local, "ray": run_ray}
