"""Exports of a HeadTaxonomy: round trips, atomic writes, and clear errors."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from fake_scores import random_taxonomy

from headclass.atomic import atomic_write
from headclass.errors import HeadclassError
from headclass.report.export import ExportError, read, read_json, read_parquet, write
from headclass.taxonomy import HeadTaxonomy


@pytest.fixture
def tax() -> HeadTaxonomy:
    t = random_taxonomy(5, 3, seed=7, model="tiny/model", ablation=True)
    table = t.table
    table.loc[2, "induction"] = float("nan")  # a score that could not be computed
    return HeadTaxonomy(table, t.metadata)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# -- round trips ----------------------------------------------------------------------------------
def test_json_round_trip_is_exact(tax, tmp_path):
    path = tax.to_json(tmp_path / "t.json")
    assert path == tmp_path / "t.json"
    back = read_json(path)
    pd.testing.assert_frame_equal(back.table, tax.table)  # values and dtypes
    assert back.metadata == tax.metadata
    assert back.equals(tax)
    assert back.table["is_induction"].dtype == bool and back.table["layer"].dtype == "int64"
    assert str(back.table["fixed_offset_k"].dtype) == "Int64"


def test_json_is_standard_json_with_records_and_metadata(tax, tmp_path):
    tax.to_json(tmp_path / "t.json")
    text = (tmp_path / "t.json").read_text()
    assert "NaN" not in text  # NaN written as null: any JSON reader accepts the file
    doc = json.loads(text)
    assert doc["kind"] == "headclass.HeadTaxonomy" and doc["version"] == 1
    assert doc["metadata"]["model"] == "tiny/model"
    assert len(doc["records"]) == 15 and doc["records"][2]["induction"] is None
    assert {c["name"]: c["dtype"] for c in doc["columns"]}["is_bos"] == "bool"


def test_parquet_round_trip_is_exact(tax, tmp_path):
    tax.to_parquet(tmp_path / "t.parquet")
    back = read_parquet(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(back.table, tax.table)
    assert back.metadata == tax.metadata
    assert read(tmp_path / "t.parquet").equals(tax)


def test_csv_has_the_table(tax, tmp_path):
    tax.to_csv(tmp_path / "t.csv")
    df = pd.read_csv(tmp_path / "t.csv")
    assert list(df.columns) == list(tax.table.columns)
    assert len(df) == 15
    pd.testing.assert_series_equal(df["margin"], tax.table["margin"], check_exact=False)
    assert df["is_bos"].dtype == bool


def test_markdown_report(tax, tmp_path):
    tax.to_markdown(tmp_path / "t.md")
    text = (tmp_path / "t.md").read_text()
    assert text.startswith("# Attention heads of tiny/model")
    assert "## Labels" in text and "## Heads" in text and "## Thresholds" in text
    head_rows = [
        line for line in text.splitlines() if line.startswith("|") and line.strip("|").split("|")[0].strip().isdigit()
    ]
    assert len(head_rows) >= 15  # every head (plus threshold/summary rows starting with digits, if any)


def test_save_picks_format_from_suffix(tax, tmp_path):
    for name in ("a.json", "a.csv", "a.parquet", "a.md"):
        assert tax.save(tmp_path / name).is_file()
    assert read_json(tmp_path / "a.json").equals(tax)
    tax.save(tmp_path / "noext", format="json")
    assert read(tmp_path / "noext", format="json").equals(tax)


def test_to_html_delegates_to_the_report_module(tax, tmp_path, monkeypatch):
    seen = {}

    def render_html_report(taxonomy):
        seen["taxonomy"] = taxonomy
        return "<html>report</html>"

    fake = types.ModuleType("headclass.report.html")
    fake.render_html_report = render_html_report
    monkeypatch.setitem(sys.modules, "headclass.report.html", fake)
    out = tax.to_html(tmp_path / "r.html")
    assert seen["taxonomy"] is tax  # rendered once, written once by the one atomic writer
    assert out.read_text() == "<html>report</html>"
    assert leftovers(tmp_path) == []


# -- atomic writes --------------------------------------------------------------------------------
def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.json"

    def half_then_fail(tmp):
        tmp.write_text('{"half": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert not target.exists() and leftovers(tmp_path) == []


class _HalfWrites:
    """``builtins.open`` for files under ``root`` opened for writing: the first ``write`` puts
    half its text on disk, then fails with ENOSPC (a disk that fills up midway)."""

    def __init__(self, root: Path):
        self.root = str(root)
        self.failed: list[str] = []

    def install(self, monkeypatch) -> "_HalfWrites":
        import builtins
        import errno

        real_open = builtins.open

        def fake_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if not isinstance(file, int) and str(file).startswith(self.root) and ("w" in mode or "a" in mode):
                real_write, failed = handle.write, self.failed

                def half_write(data):
                    real_write(data[: len(data) // 2])
                    handle.flush()
                    failed.append(str(file))
                    raise OSError(errno.ENOSPC, "No space left on device")

                handle.write = half_write
            return handle

        monkeypatch.setattr(builtins, "open", fake_open)
        return self


def test_failed_export_keeps_the_old_file(tax, tmp_path, monkeypatch):
    """The disk fills up halfway through writing the new JSON: the old file is intact."""
    target = tmp_path / "t.json"
    tax.to_json(target)
    before = target.read_bytes()
    half = _HalfWrites(tmp_path).install(monkeypatch)
    with pytest.raises(OSError, match="No space left on device"):
        tax.to_json(target)
    monkeypatch.undo()
    assert len(half.failed) == 1  # a file was opened and half written before the failure
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def test_failed_parquet_write_midway_leaves_nothing(tax, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def write_some_then_fail(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 partial")
        raise OSError("interrupted")

    monkeypatch.setattr(pq, "write_table", write_some_then_fail)
    with pytest.raises(OSError, match="interrupted"):
        tax.to_parquet(tmp_path / "t.parquet")
    assert list(tmp_path.iterdir()) == []


def test_failed_csv_write_midway_leaves_nothing(tax, tmp_path, monkeypatch):
    """Half the CSV is on disk when the write fails: no t.csv, no temporary left."""
    half = _HalfWrites(tmp_path).install(monkeypatch)
    with pytest.raises(OSError, match="No space left on device"):
        tax.to_csv(tmp_path / "t.csv")
    monkeypatch.undo()
    assert len(half.failed) == 1
    assert list(tmp_path.iterdir()) == []


# -- errors --------------------------------------------------------------------------------------
def test_unknown_format(tax, tmp_path):
    with pytest.raises(ExportError, match="unknown format 'xlsx'"):
        tax.save(tmp_path / "t.xlsx", format="xlsx")
    with pytest.raises(ExportError, match="suffix '.xlsx'"):
        tax.save(tmp_path / "t.xlsx")
    with pytest.raises(ExportError, match="suffix"):
        tax.save(tmp_path / "t")


def test_bad_paths(tax, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        tax.to_json(tmp_path / "missing" / "t.json")
    with pytest.raises(ExportError, match="is a folder"):
        tax.to_json(tmp_path)
    with pytest.raises(ExportError, match="str or os.PathLike"):
        tax.to_json(42)
    assert isinstance(ExportError("x"), HeadclassError) and isinstance(ExportError("x"), ValueError)


def test_reading_bad_files(tax, tmp_path):
    with pytest.raises(ExportError, match="no taxonomy file"):
        read_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ExportError, match="not a headclass taxonomy"):
        read_json(tmp_path / "other.json")
    (tmp_path / "plain.parquet").write_bytes(b"nope")
    with pytest.raises(ExportError, match="not a readable parquet"):
        read_parquet(tmp_path / "plain.parquet")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "foreign.parquet")
    with pytest.raises(ExportError, match="not written by headclass"):
        read_parquet(tmp_path / "foreign.parquet")
    tax.to_csv(tmp_path / "t.csv")
    with pytest.raises(ExportError, match="to_json or to_parquet"):
        read(tmp_path / "t.csv")


def test_write_needs_a_taxonomy(tmp_path):
    with pytest.raises(ExportError, match="HeadTaxonomy"):
        write(pd.DataFrame(), tmp_path / "t.json")


def test_extra_columns_round_trip(tmp_path):
    import torch
    from fake_scores import random_scores

    from headclass.taxonomy import label_heads

    scores = random_scores(3, 2)
    scores["writes_nothing"] = torch.tensor([[True, False]] * 3)
    scores["ov_norm"] = torch.rand(3, 2)
    tax = HeadTaxonomy(label_heads(scores, model="x"), {"model": "x"})
    for name in ("t.json", "t.parquet"):
        back = read(tax.save(tmp_path / name))
        pd.testing.assert_frame_equal(back.table, tax.table)
    assert tax.table["writes_nothing"].dtype == bool
