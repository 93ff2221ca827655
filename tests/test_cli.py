"""The ``headclass`` command, run as a user runs it (a subprocess) where it matters.

Errors must be one readable line on stderr, a non-zero exit, and no file in --out. Fast tests
use a tiny GPT-2 saved to a folder; one test runs the real SmolLM2-135M.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from headclass import cli
from headclass.report.export import read_json


def run(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "headclass", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("headclass: error: "), lines[0]
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_has_examples():
    done = run("--help")
    assert done.returncode == 0
    for text in ("classify", "compare", "demo", "examples:", "headclass classify smollm2-135m --out"):
        assert text in done.stdout
    sub = run("classify", "--help")
    for flag in ("--config", "--out", "--format", "--ablation", "--device", "--backend"):
        assert flag in sub.stdout


def test_classify_tiny_folder_writes_csv_json_html(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "report"
    done = run("classify", str(tiny_gpt2_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr
    stem = Path(tiny_gpt2_dir).name
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{stem}{s}" for s in (".csv", ".json", ".html")] + ["headclass-run.json"]
    )
    table = pd.read_csv(out / f"{stem}.csv")
    assert len(table) == 2 * 4 and {"layer", "head", "primary_label"} <= set(table.columns)
    tax = read_json(out / f"{stem}.json")
    assert tax.n_layers == 2 and tax.n_heads == 4
    assert 'id="head-grid"' in (out / f"{stem}.html").read_text(encoding="utf-8")
    assert str(out) in done.stdout
    assert done.stderr.count("headclass: error") == 0


def test_classify_other_formats(tiny_gpt2_dir, tmp_path):
    done = run("classify", str(tiny_gpt2_dir), "--out", str(tmp_path / "o"), "--format", "md,parquet", "-q")
    assert done.returncode == 0, done.stderr
    stem = Path(tiny_gpt2_dir).name
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["headclass-run.json", f"{stem}.md", f"{stem}.parquet"]


def test_bad_model_name(tmp_path):
    out = tmp_path / "out"
    done = run("classify", "no-such-model-xyz", "--out", str(out))
    assert_one_line_error(done, "unknown model 'no-such-model-xyz'")
    assert not out.exists()


def test_missing_model_folder(tmp_path):
    done = run("classify", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert_one_line_error(done, "no such file or folder")
    assert not (tmp_path / "out").exists()


def test_bad_config(tiny_gpt2_dir, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("thresholds:\n  inducton: 0.5\n  bos: 3\n")
    out = tmp_path / "out"
    done = run("classify", str(tiny_gpt2_dir), "--config", str(config), "--out", str(out))
    assert_one_line_error(done, "invalid config", "thresholds.inducton: unknown key", "thresholds.bos")
    assert not out.exists()
    missing = run("classify", str(tiny_gpt2_dir), "--config", str(tmp_path / "none.yaml"), "--out", str(out))
    assert_one_line_error(missing, "does not exist")
    assert not out.exists()


def test_bad_format(tiny_gpt2_dir, tmp_path):
    done = run("classify", str(tiny_gpt2_dir), "--format", "csv,xls", "--out", str(tmp_path / "out"))
    assert_one_line_error(done, "unknown format 'xls'")
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_no_partial_files(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    """The HTML report fails after CSV and JSON were written: --out must stay empty."""
    import headclass.report.html as report_html

    def broken(*args, **kwargs):
        raise ValueError("simulated failure in the HTML report")

    monkeypatch.setattr(report_html, "render_html_report", broken)
    out = tmp_path / "out"
    out.mkdir()
    status = cli.main(["classify", str(tiny_gpt2_dir), "--out", str(out), "-q"])
    assert status == 1
    assert list(out.iterdir()) == []
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("headclass: warning: ")]
    assert err == ["headclass: error: simulated failure in the HTML report"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left beside it


def test_demo_prints_summary(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "DEMO_MODEL", str(tiny_gpt2_dir))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "-q"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "headclass-report"
    stem = Path(tiny_gpt2_dir).name
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{stem}{s}" for s in (".csv", ".json", ".html")] + ["headclass-run.json"]
    )
    assert "heads per label" in out and "top induction heads: L" in out and "top previous-token heads: L" in out
    assert "headclass-report" in out


def test_compare_two_models(tiny_gpt2_dir, tiny_llama_dir, tmp_path):
    out = tmp_path / "cmp"
    done = run("compare", str(tiny_gpt2_dir), str(tiny_llama_dir), "--out", str(out), "--bins", "2")
    assert done.returncode == 0, done.stderr
    names = {p.name for p in out.iterdir()}
    assert {"comparison.csv", "comparison_counts.csv", "comparison.html"} <= names
    for folder in (tiny_gpt2_dir, tiny_llama_dir):
        assert f"{Path(folder).name}.json" in names
    table = pd.read_csv(out / "comparison.csv")
    assert set(table["model"]) == {Path(tiny_gpt2_dir).name, Path(tiny_llama_dir).name}


def test_python_dash_m_and_console_script_agree():
    done = run("--version")
    assert done.returncode == 0 and done.stdout.startswith("headclass ")
    script = Path(sys.executable).with_name("headclass")
    assert script.is_file(), f"the console script {script} is missing: pip install -e . in this venv"
    same = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert same.returncode == 0 and same.stdout == done.stdout


@pytest.mark.smollm2
@pytest.mark.slow
def test_classify_smollm2(tmp_path):
    # Smaller probes than the defaults (as in tests/test_taxonomy.py); `make demo` runs the defaults.
    config = tmp_path / "fast.yaml"
    config.write_text(
        "probes:\n  repeated: {n_sequences: 8, segment_length: 32}\n"
        "  text: {n_sequences: 8, max_tokens: 64}\nweights:\n  copy_sample_size: 500\n"
    )
    out = tmp_path / "smollm2"
    done = run("classify", "smollm2-135m", "--config", str(config), "--out", str(out), timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "headclass-run.json",
        "smollm2-135m.csv",
        "smollm2-135m.html",
        "smollm2-135m.json",
    ]
    table = pd.read_csv(out / "smollm2-135m.csv")
    assert len(table) == 30 * 9
    meta = json.loads((out / "smollm2-135m.json").read_text())
    assert "smollm2-135m" in json.dumps(meta)
    assert "induction" in done.stdout
