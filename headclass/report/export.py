"""Write a :class:`~headclass.taxonomy.HeadTaxonomy` to disk, and read it back.

Formats: ``csv`` (the table only), ``json`` (records + dtypes + metadata; round-trips exactly),
``parquet`` (needs ``pyarrow``; metadata in the schema metadata; round-trips exactly),
``markdown`` (a readable report) and ``html`` (the self-contained report of
:mod:`headclass.report.html`). Every file is written through the one atomic writer,
:mod:`headclass.atomic`: to a temporary file in the same folder, then renamed over the target,
so a failure never leaves a partial file.

Examples
--------
>>> from headclass.report.export import write, read_json
>>> write(tax, "smollm2.json")          # format from the suffix
>>> tax2 = read_json("smollm2.json")    # an equal taxonomy
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd

from headclass.atomic import atomic_write, write_text
from headclass.errors import HeadclassError, MissingDependencyError
from headclass.taxonomy import HeadTaxonomy

__all__ = ["ExportError", "FORMATS", "write", "read", "read_json", "read_parquet"]

#: Format name -> file suffixes that imply it.
FORMATS: dict[str, tuple[str, ...]] = {
    "csv": (".csv",),
    "json": (".json",),
    "parquet": (".parquet", ".pq"),
    "markdown": (".md", ".markdown"),
    "html": (".html", ".htm"),
}

#: Marks headclass JSON files (and parquet schema metadata).
JSON_KIND = "headclass.HeadTaxonomy"
JSON_VERSION = 1
_PARQUET_KEY = b"headclass"

PathLike = Union[str, "os.PathLike[str]"]


class ExportError(HeadclassError, ValueError):
    """A taxonomy cannot be written to / read from a path: bad path, format or file content."""


# -- paths ------------------------------------------------------------------------------------
def _check_target(path: PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"path must be a str or os.PathLike; got {type(path).__name__}.")
    target = Path(path).expanduser()
    if str(path) == "" or target.name == "":
        raise ExportError(f"path {str(path)!r} has no file name.")
    if target.is_dir():
        raise ExportError(f"path {str(target)!r} is a folder; give a file path such as {str(target / 'heads.json')!r}.")
    parent = target.parent
    if not parent.is_dir():
        raise ExportError(f"cannot write {str(target)!r}: folder {str(parent)!r} does not exist.")
    return target


# -- dispatch --------------------------------------------------------------------------------
def _format_of(path: PathLike, format: Optional[str]) -> str:
    if format is not None:
        fmt = {"md": "markdown", "htm": "html", "pq": "parquet"}.get(str(format).lower(), str(format).lower())
        if fmt not in FORMATS:
            raise ExportError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}.")
        return fmt
    suffix = Path(str(path)).suffix.lower()
    for fmt, suffixes in FORMATS.items():
        if suffix in suffixes:
            return fmt
    known = ", ".join(s for suffixes in FORMATS.values() for s in suffixes)
    raise ExportError(
        f"cannot tell the format of {str(path)!r} from its suffix {suffix or '(none)'!r}; "
        f"use a suffix among {known} or pass format= ({', '.join(FORMATS)})."
    )


def write(taxonomy: HeadTaxonomy, path: PathLike, format: Optional[str] = None) -> Path:
    """Write ``taxonomy`` to ``path``; ``format`` defaults to the one the suffix names.

    Returns the path written. Raises :class:`ExportError` for an unknown format, a folder as
    path or a missing parent folder.
    """
    if not isinstance(taxonomy, HeadTaxonomy):
        raise ExportError(f"expected a HeadTaxonomy; got {type(taxonomy).__name__}.")
    fmt = _format_of(path, format)
    _check_target(path)
    writer = {
        "csv": write_csv,
        "json": write_json,
        "parquet": write_parquet,
        "markdown": write_markdown,
        "html": write_html,
    }[fmt]
    return writer(taxonomy, path)


def read(path: PathLike, format: Optional[str] = None) -> HeadTaxonomy:
    """Read a taxonomy written as ``json`` or ``parquet`` (the formats that keep metadata)."""
    fmt = _format_of(path, format)
    if fmt == "json":
        return read_json(path)
    if fmt == "parquet":
        return read_parquet(path)
    raise ExportError(f"cannot read a taxonomy back from {fmt}; write it with to_json or to_parquet.")


# -- csv -------------------------------------------------------------------------------------
def write_csv(taxonomy: HeadTaxonomy, path: PathLike) -> Path:
    """The head table as CSV (no metadata; booleans as True/False, NaN as empty)."""
    return write_text(_check_target(path), taxonomy.table.to_csv(index=False))


# -- json ------------------------------------------------------------------------------------
def _json_value(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    return str(value)


def _dtype_name(dtype: Any) -> str:
    if pd.api.types.is_bool_dtype(dtype) and not isinstance(dtype, pd.BooleanDtype):
        return "bool"
    if isinstance(dtype, pd.api.extensions.ExtensionDtype) and not pd.api.types.is_string_dtype(dtype):
        return str(dtype)  # Int64, boolean...
    if pd.api.types.is_integer_dtype(dtype):
        return "int64"
    if pd.api.types.is_float_dtype(dtype):
        return "float64"
    return "str"


def _restore(columns: dict[str, list[Any]], dtypes: dict[str, str], source: str) -> pd.DataFrame:
    """The table from column values and dtype names; a value that does not fit its column's
    dtype raises :class:`ExportError` naming ``source``, the column and the value."""
    data = {}
    for name, values in columns.items():
        kind = dtypes.get(name, "str")
        try:
            data[name] = _column(values, kind)
        except (ValueError, TypeError, OverflowError):
            bad = next((v for v in values if not _fits(v, kind)), None)
            raise ExportError(f"{source}: column {name!r} ({kind}) has a value that is not {kind}: {bad!r}.") from None
        if kind in ("int64", "bool") and any(v is None for v in values):
            raise ExportError(f"{source}: column {name!r} ({kind}) has missing values.")
    return pd.DataFrame(data)


def _column(values: list[Any], kind: str) -> pd.Series:
    if kind == "float64":
        return pd.Series([math.nan if v is None else _float(v) for v in values], dtype="float64")
    if kind == "int64":
        if not all(
            v is None or (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
            for v in values
        ):
            raise ValueError("not an integer")
        return pd.Series(values, dtype="float64" if None in values else "int64")
    if kind == "bool":
        if any(not isinstance(v, (bool, type(None))) for v in values):
            raise ValueError("not a boolean")
        return pd.Series(values, dtype=object if None in values else "bool")
    if kind == "str":
        return pd.Series(["" if v is None else str(v) for v in values], dtype=object).astype(str)
    return pd.Series([pd.NA if v is None else v for v in values], dtype=kind)


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("not a number")
    if isinstance(value, str) and value not in ("inf", "-inf"):
        raise ValueError("not a number")
    return float(value)


def _fits(value: Any, kind: str) -> bool:
    try:
        _column([value], kind)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def to_json_dict(taxonomy: HeadTaxonomy) -> dict[str, Any]:
    """The JSON document: ``kind``, ``version``, ``metadata``, ``columns`` (name + dtype),
    ``records`` (one object per head), and ``evidence`` (what the head cards show,
    :mod:`headclass.scores.examples`) when the taxonomy has it: an optional key, so version 1
    readers that do not know it still read the table."""
    table = taxonomy.table
    columns = [{"name": str(c), "dtype": _dtype_name(table[c].dtype)} for c in table.columns]
    records = [
        {str(c): _json_value(v) for c, v in zip(table.columns, row)} for row in table.itertuples(index=False, name=None)
    ]
    doc = {
        "kind": JSON_KIND,
        "version": JSON_VERSION,
        "metadata": taxonomy.metadata,
        "columns": columns,
        "records": records,
    }
    evidence = taxonomy._evidence
    if evidence is not None:
        doc["evidence"] = evidence
    return doc


def write_json(taxonomy: HeadTaxonomy, path: PathLike) -> Path:
    """Records plus metadata and column dtypes, readable by :func:`read_json`."""
    doc = to_json_dict(taxonomy)
    try:
        text = json.dumps(doc, indent=1, allow_nan=False, default=_json_value)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"the taxonomy's metadata cannot be written as JSON: {exc}") from None
    return write_text(_check_target(path), text + "\n")


def from_json_dict(doc: Any, source: str = "(dict)") -> HeadTaxonomy:
    """Rebuild a taxonomy from :func:`to_json_dict`'s document."""
    if not isinstance(doc, dict) or doc.get("kind") != JSON_KIND:
        raise ExportError(f'{source} is not a headclass taxonomy JSON file (no "kind": "{JSON_KIND}").')
    if doc.get("version") != JSON_VERSION:
        raise ExportError(
            f"{source} has taxonomy format version {doc.get('version')!r}; this headclass reads {JSON_VERSION}."
        )
    try:
        names = [c["name"] for c in doc["columns"]]
        dtypes = {c["name"]: c["dtype"] for c in doc["columns"]}
        columns = {name: [rec.get(name) for rec in doc["records"]] for name in names}
    except (KeyError, TypeError, AttributeError) as exc:
        raise ExportError(f"{source} is malformed ({exc!r} missing or wrong).") from None
    table = _restore(columns, dtypes, source)
    evidence = doc.get("evidence")
    if evidence is not None and not isinstance(evidence, dict):
        raise ExportError(
            f'{source}: "evidence" must be an object (the head cards\' evidence); got {type(evidence).__name__}.'
        )
    try:
        return HeadTaxonomy.from_table(table, doc.get("metadata") or {}, evidence=evidence)
    except ExportError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise ExportError(f"{source} does not hold a valid taxonomy table: {exc}") from None


def read_json(path: PathLike) -> HeadTaxonomy:
    """Read a taxonomy written by :meth:`HeadTaxonomy.to_json`: the same table (values and
    dtypes) and metadata."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ExportError(f"no taxonomy file at {str(p)!r}.")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{str(p)!r} is not valid JSON: {exc}") from None
    return from_json_dict(doc, repr(str(p)))


# -- parquet ---------------------------------------------------------------------------------
def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "parquet export needs pyarrow: pip install 'headclass[export]' (or pip install pyarrow)."
        ) from None
    return pyarrow


def write_parquet(taxonomy: HeadTaxonomy, path: PathLike) -> Path:
    """Parquet with the metadata (and dtypes) as JSON in the schema metadata."""
    pa = _pyarrow()
    table = taxonomy.table
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    fields = {
        "kind": JSON_KIND,
        "version": JSON_VERSION,
        "metadata": taxonomy.metadata,
        "dtypes": {str(c): _dtype_name(table[c].dtype) for c in table.columns},
    }
    if taxonomy._evidence is not None:
        fields["evidence"] = taxonomy._evidence
    extra = json.dumps(fields, default=_json_value)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), _PARQUET_KEY: extra.encode()})
    return atomic_write(_check_target(path), lambda tmp: pa.parquet.write_table(arrow, str(tmp)))


def read_parquet(path: PathLike) -> HeadTaxonomy:
    """Read a taxonomy written by :meth:`HeadTaxonomy.to_parquet`."""
    pa = _pyarrow()
    p = Path(path).expanduser()
    if not p.is_file():
        raise ExportError(f"no taxonomy file at {str(p)!r}.")
    try:
        arrow = pa.parquet.read_table(str(p))
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ExportError(f"{str(p)!r} is not a readable parquet file: {exc}") from None
    raw = (arrow.schema.metadata or {}).get(_PARQUET_KEY)
    if raw is None:
        raise ExportError(f"{str(p)!r} was not written by headclass (no taxonomy metadata).")
    extra = json.loads(raw.decode())
    df = arrow.to_pandas()
    columns = {c: [_json_value(v) for v in df[c].tolist()] for c in df.columns}
    table = _restore(columns, extra.get("dtypes", {}), repr(str(p)))
    try:
        return HeadTaxonomy.from_table(table, extra.get("metadata") or {}, evidence=extra.get("evidence"))
    except ExportError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise ExportError(f"{str(p)!r} does not hold a valid taxonomy table: {exc}") from None


# -- markdown --------------------------------------------------------------------------------
def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub pipe table through pandas' ``to_markdown`` (``tabulate``): floats to 3 decimals,
    NaN / NA empty, numbers right-aligned, ``|`` inside text escaped."""
    try:
        import tabulate  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "markdown export needs tabulate: pip install 'headclass[export]' (or pip install tabulate)."
        ) from None
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    return df.map(_cell).to_markdown(
        index=False, tablefmt="github", disable_numparse=True, colalign=["right" if n else "left" for n in numeric]
    )


def _cell(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown_text(taxonomy: HeadTaxonomy) -> str:
    """The Markdown report: facts, thresholds, the per-label summary and every head."""
    meta = taxonomy.metadata
    lines = [f"# Attention heads of {taxonomy.model_name}", ""]
    facts: list[tuple[str, Any]] = [
        ("layers", taxonomy.n_layers),
        ("heads per layer", taxonomy.n_heads),
        ("heads", len(taxonomy)),
    ]
    for key in ("n_params", "backend", "probe_seed", "date"):
        if meta.get(key) is not None:
            facts.append((key.replace("_", " "), meta[key]))
    versions = meta.get("versions") or {}
    if versions:
        facts.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
    lines += [f"- **{k}**: {v}" for k, v in facts] + [""]
    thresholds = (meta.get("config") or {}).get("thresholds")
    if thresholds:
        lines += [
            "## Thresholds",
            "",
            markdown_table(
                pd.DataFrame({"threshold": list(thresholds), "value": [float(v) for v in thresholds.values()]})
            ),
            "",
        ]
    lines += ["## Labels", "", markdown_table(taxonomy.summary()), ""]
    table = taxonomy.table
    cols = ["layer", "head", "primary_label", "margin", "labels"] + [
        c
        for c in table.columns
        if c not in ("model", "relative_depth", "primary_label", "margin", "labels", "layer", "head")
        and not c.startswith("is_")
    ]
    lines += ["## Heads", "", markdown_table(table[cols]), ""]
    return "\n".join(lines)


def write_markdown(taxonomy: HeadTaxonomy, path: PathLike) -> Path:
    """A readable Markdown report (see :func:`to_markdown_text`)."""
    return write_text(_check_target(path), to_markdown_text(taxonomy))


# -- html ------------------------------------------------------------------------------------
def write_html(taxonomy: HeadTaxonomy, path: PathLike) -> Path:
    """The self-contained HTML report of :func:`headclass.report.html.write_html_report`."""
    from headclass.report.html import render_html_report

    return write_text(_check_target(path), render_html_report(taxonomy))
