"""Hostile inputs and faults (issue 11): never a silently wrong table, never partial output,
never a traceback.

Each test reproduces one item with tiny models built here, and asserts the exit status, the
one-line message, and the exact state of --out and of its parent afterwards (no staging
folder left). Most run the CLI in-process (``cli.main([...])``); the interrupt tests and the
hub tests run it as a real subprocess. ``docs/failure-modes.md`` lists every case.
Publishing under injected faults (every k-th file operation) is in ``tests/test_publish.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_gpt2

from headclass import cli

TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)


# -- helpers -------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, object]:
    """Every entry under ``folder`` (hidden ones too): relative path -> bytes, or "<dir>"."""
    out: dict[str, object] = {}
    if not folder.exists():
        return out
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = "<dir>" if path.is_dir() else path.read_bytes()
    return out


def one_error_line(err: str) -> str:
    """The one line of a failed command's stderr, warnings about probe sizes aside."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("headclass: warning: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def run_main(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()  # what the test printed while building its models
    status = cli.main(list(args))
    return status, capsys.readouterr().err


def save_model(folder: Path, **overrides) -> Path:
    return save_tiny_gpt2(folder, **{**TINY, **overrides})


def poisoned(folder: Path, source: Path, attribute: str) -> Path:
    """A copy of the tiny GPT-2 at ``source`` with one NaN in ``transformer.h[0].<attribute>``."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(source)
    with torch.no_grad():
        model.transformer.h[0].get_parameter(attribute)[0, 0] = float("nan")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def tiny_taxonomy(tiny_dir):
    import headclass

    return headclass.classify(headclass.load_model(tiny_dir), progress=False)


def renamed(taxonomy, name: str):
    """The same taxonomy under another model name (to test file naming without classifying)."""
    from headclass.taxonomy import HeadTaxonomy

    table = taxonomy.table
    table["model"] = name
    return HeadTaxonomy(table, {**taxonomy.metadata, "model": name})


@pytest.fixture
def fast_classify(monkeypatch, tiny_taxonomy):
    """Make the CLI's classification instant: every source gets the tiny taxonomy, named after
    the source's last path component (as load_model names folders)."""
    calls: list[str] = []

    def classify_one(source, config, args, status, run, *, ablation=False):
        calls.append(source)
        run.enter("loading")
        run.enter("classifying")
        return renamed(tiny_taxonomy, Path(source).name)

    monkeypatch.setattr(cli, "_classify_one", classify_one)
    return calls


# -- 1. non-finite weights and activations -----------------------------------------------------------


def test_nan_in_an_mlp_weight_is_an_error_naming_layer_0(tiny_dir, tmp_path, capsys):
    model = poisoned(tmp_path / "nan-mlp", tiny_dir, "mlp.c_fc.weight")
    out = tmp_path / "out"
    status, err = run_main(capsys, "classify", str(model), "--out", str(out), "-q")
    line = one_error_line(err)
    assert status == 1
    assert line.startswith("headclass: error: model 'nan-mlp' has non-finite weights (NaN or inf) in layer 0 ")
    assert "mlp.c_fc.weight" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nan-mlp"]


def test_nan_in_an_attention_weight_names_layer_and_head_not_an_svd_error(tiny_dir, tmp_path, capsys):
    model = poisoned(tmp_path / "nan-attn", tiny_dir, "attn.c_attn.weight")
    status, err = run_main(capsys, "classify", str(model), "--out", str(tmp_path / "out"), "-q")
    assert status == 1
    assert one_error_line(err) == (
        "headclass: error: model 'nan-attn' has non-finite weights (NaN or inf): W_Q of layer 0 head 0. "
        "Fix or re-download the checkpoint; no table was made."
    )
    assert "LinAlgError" not in err and not (tmp_path / "out").exists()


def test_the_api_refuses_a_nan_model_at_load(tiny_dir, tmp_path):
    import headclass
    from headclass.errors import ScoreError

    model = poisoned(tmp_path / "nan-attn", tiny_dir, "attn.c_attn.weight")
    with pytest.raises(ScoreError, match="W_Q of layer 0 head 0"):
        headclass.load_model(model)


def _poison_activations(model, hook_point: str, how: str) -> None:
    def poison(x, hook):
        x = x.clone()
        if how == "nan":
            x[:, 1:] = float("nan")
        else:
            x.mul_(0.0)
        return x

    model.tl_model.add_hook(hook_point, poison, is_permanent=True)


@pytest.mark.parametrize("hook_point, how", [("blocks.0.hook_mlp_out", "nan"), ("blocks.1.attn.hook_pattern", "zero")])
def test_broken_patterns_fail_the_pass_that_saw_them(tiny_dir, hook_point, how):
    """Finite weights, broken activations: NaN from an MLP (the bridge then gives rows that sum
    to 0, not NaN) or attention rows zeroed. The hooks do not wait for the host (GPU), so the
    callback may see the broken layer; the pass itself then fails naming it, before anything
    computed from it can be published."""
    import headclass
    from headclass.errors import ScoreError

    model = headclass.load_model(tiny_dir)
    _poison_activations(model, hook_point, how)
    seen: list[int] = []
    try:
        broken = r"attention pattern of layer 1 head 0 (is not finite|has rows that do not sum to 1)"
        with pytest.raises(ScoreError, match=broken):
            model.run_with_patterns(torch.randint(1, 100, (2, 8)), lambda layer, pattern: seen.append(layer))
    finally:
        model.tl_model.reset_hooks(including_permanent=True)
    assert seen == list(range(model.n_layers))


def test_pattern_check_rules():
    from headclass.errors import ScoreError
    from headclass.loading.head_model import _check_patterns, _pattern_check

    def _check_pattern(pattern, layer, name, sinks=False):  # one layer, as a pattern hook checks it
        _check_patterns({layer: _pattern_check(pattern, sinks)}, name)

    good = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)
    _check_pattern(good, 0, "m")
    _check_pattern(good.to(torch.bfloat16), 0, "m")
    _check_pattern(good * 0.4, 0, "m", sinks=True)  # GPT-OSS: a sink takes part of each row
    with pytest.raises(ScoreError, match="layer 3 head 0 has rows that do not sum to 1"):
        _check_pattern(good * 0.4, 3, "m")
    broken = good.clone()
    broken[1, 2, 4, 0] = float("inf")
    with pytest.raises(ScoreError, match="layer 0 head 2 is not finite"):
        _check_pattern(broken, 0, "m", sinks=True)
    zero = good.clone()
    zero[:, 1] = 0.0  # what the bridge makes of NaN scores
    with pytest.raises(ScoreError, match="layer 0 head 1 has rows that do not sum to 1"):
        _check_pattern(zero, 0, "m", sinks=True)


def test_broken_activations_give_no_table_in_the_cli(tiny_dir, tmp_path, monkeypatch, capsys):
    import headclass.loading

    real = headclass.loading.load_model

    def load_broken(source, **kwargs):
        model = real(source, **kwargs)
        _poison_activations(model, "blocks.0.hook_mlp_out", "nan")
        return model

    monkeypatch.setattr(headclass.loading, "load_model", load_broken)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    status, err = run_main(capsys, "classify", str(tiny_dir), "--out", str(out), "-q")
    assert status == 1
    assert one_error_line(err).startswith("headclass: error: model 'tiny': the attention pattern of layer 1 head 0 ")
    assert snapshot(tmp_path) == before


def test_the_pattern_checks_sync_once_per_pass(tiny_dir, monkeypatch):
    """Every layer's check is read in one host transfer after the pass (none in the hooks:
    tests/loading/test_big_models.py checks that for the whole pattern pass)."""
    import headclass

    model = headclass.load_model(tiny_dir)
    calls = {"item": 0, "cpu": 0}
    real = {name: getattr(torch.Tensor, name) for name in calls}

    def counting(name):
        def method(self, *args, **kwargs):
            calls[name] += 1
            return real[name](self, *args, **kwargs)

        return method

    for name in calls:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    model.run_with_patterns(torch.randint(1, 100, (2, 8)), lambda layer, pattern: None)
    assert calls == {"item": 0, "cpu": 1} and model.n_layers > 1


# -- 2. compare: unique stems, never the comparison's own files -----------------------------------------


def test_slug_keeps_the_organisation_and_any_script():
    assert cli._slug("EleutherAI/pythia-160m") == "EleutherAI-pythia-160m"
    assert cli._slug("u/x y") == cli._slug("u/x-y") == "u-x-y"
    assert cli._slug("u/模型") == "u-模型" and cli._slug("u/αβ") == "u-αβ"
    assert cli._slug("///") == "model"
    assert cli._unique_stems(["u/x y", "u/x-y", "U/X-Y"]) == ["u-x-y", "u-x-y-2", "U-X-Y-3"]
    stems = cli._unique_stems(["comparison", "comparison_counts", "headclass-run"], reserved=cli._COMPARISON_STEMS)
    assert stems == ["comparison-2", "comparison_counts-2", "headclass-run-2"]


def test_compare_never_overwrites_one_model_with_another(tmp_path, monkeypatch, capsys, fast_classify):
    models = tmp_path / "models"
    sources = []
    for name in ("x y", "x-y", "comparison", "模型", "αβ"):
        save_model(models / name)
        sources.append(str(models / name))
    out = tmp_path / "cmp"
    status = cli.main(["compare", *sources, "--out", str(out), "-q", "--bins", "2"])
    printed = capsys.readouterr().out
    assert status == 0
    stems = ["x-y", "x-y-2", "comparison-2", "模型", "αβ"]
    expected = sorted(
        [f"{s}{x}" for s in stems for x in (".csv", ".json", ".html")]
        + ["comparison.csv", "comparison_counts.csv", "comparison.html", "headclass-run.json"]
    )
    assert sorted(p.name for p in out.iterdir()) == expected
    assert f"wrote {len(expected)} files to {out}/:" in printed
    for name in expected:
        assert f"  {out / name}" in printed
    from headclass.report.export import read_json

    assert read_json(out / "x-y.json").model_name == "x y"
    assert read_json(out / "x-y-2.json").model_name == "x-y"
    assert read_json(out / "comparison-2.json").model_name == "comparison"
    assert "model" in (out / "comparison.csv").read_text().splitlines()[0]  # the comparison, not a model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp", "models"]


# -- 3. publish all or nothing --------------------------------------------------------------------------


def test_a_folder_in_the_way_changes_nothing(tmp_path, capsys, fast_classify):
    out = tmp_path / "out"
    (out / "tiny.json").mkdir(parents=True)
    (out / "tiny.json" / "inside.txt").write_text("x")
    before = snapshot(tmp_path)
    status, err = run_main(capsys, "classify", "tiny", "--out", str(out), "-q")
    assert status == 1
    assert one_error_line(err) == (
        f"headclass: error: cannot write {str(out / 'tiny.json')!r}: it is a folder; move it away or choose "
        f"another --out. Nothing in {str(out)!r} was changed."
    )
    assert snapshot(tmp_path) == before


def test_a_full_disk_changes_nothing(tmp_path, monkeypatch, capsys, fast_classify):
    """The HTML write fails with ENOSPC after CSV and JSON were staged: --out as before."""
    import errno

    import headclass.atomic as atomic

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not headclass'")
    before = snapshot(tmp_path)
    real = atomic.atomic_write

    def full_on_html(path, write_to):
        if str(path).endswith(".html"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write_to)

    monkeypatch.setattr(atomic, "atomic_write", full_on_html)
    monkeypatch.setattr(
        "headclass.report.export.write_text",
        lambda path, text: full_on_html(path, lambda tmp: Path(tmp).write_text(text)),
    )
    status, err = run_main(capsys, "classify", "tiny", "--out", str(out), "-q")
    assert status == 1
    assert "No space left on device" in one_error_line(err)
    assert snapshot(tmp_path) == before


# -- 4. Ctrl-C ---------------------------------------------------------------------------------------


def _start(args: list[str], env_extra: dict[str, str], cwd: Path) -> subprocess.Popen:
    # a long pause: on a loaded machine the test may read the marker seconds after it is printed
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HEADCLASS_TEST_PAUSE_S": "300", **env_extra}
    return subprocess.Popen(
        [sys.executable, "-m", "headclass", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        preexec_fn=_interruptible,
    )


def _interruptible() -> None:
    """In the child: Ctrl-C as from a terminal. A test run started in the background of a
    non-interactive shell (``cmd &``, as CI may do) has SIGINT ignored, and children inherit that."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_at(proc: subprocess.Popen, marker: str, timeout: float = 120) -> tuple[int, str]:
    import signal
    import time

    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if line.strip() == f"headclass-test: {marker}":
            proc.send_signal(signal.SIGINT)
            break
    else:  # pragma: no cover
        proc.kill()
    _, rest = proc.communicate(timeout=60)
    return proc.returncode, "".join(seen) + rest


@pytest.mark.parametrize("phase", ["loading", "classifying", "writing", "publishing", "published"])
def test_ctrl_c_says_what_is_true(tiny_dir, tmp_path, phase):
    out = tmp_path / "out"
    proc = _start(
        ["classify", str(tiny_dir), "--out", str(out), "--format", "csv,json"],
        {"HEADCLASS_TEST_PAUSE": phase},
        tmp_path,
    )
    status, err = _interrupt_at(proc, phase)
    lines = [line for line in err.splitlines() if line.startswith("headclass") and "warning" not in line]
    assert status == 130, err
    assert "Traceback" not in err
    assert lines[0] == f"headclass-test: {phase}" and len(lines) == 2, err
    files = ["tiny.csv", "tiny.json", "headclass-run.json"]
    if phase in ("publishing", "published"):  # held back until the publication completed
        assert lines[1] == (
            f"headclass: interrupted after publishing; all 3 files were written to {out}/: {', '.join(files)}."
        )
        assert sorted(p.name for p in out.iterdir()) == sorted(files)
    else:
        where = {
            "loading": "while loading the model",
            "classifying": "while classifying",
            "writing": "while writing the outputs",
        }[phase]
        assert lines[1] == f"headclass: interrupted {where}; nothing was written ({out} is unchanged)."
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if out.exists() else [])


@pytest.mark.parametrize("entry", ["module", "script"])
def test_ctrl_c_during_the_imports_prints_one_line(tmp_path, entry):
    import signal

    script = Path(sys.executable).with_name("headclass")
    cmd = [sys.executable, "-m", "headclass"] if entry == "module" else [str(script)]
    env = {**os.environ, "HEADCLASS_TEST_PAUSE": "imports", "HEADCLASS_TEST_PAUSE_S": "300"}
    proc = subprocess.Popen(
        [*cmd, "classify", "gpt2", "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_interruptible,
    )
    marker = proc.stderr.readline()  # printed once the guard is in place, before torch is imported
    assert marker.strip() == "headclass-test: imports", marker
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("headclass: interrupted"), err
    assert "nothing was written" in lines[0]
    assert list(tmp_path.iterdir()) == []


# -- 5. corrupt files and too-short contexts: one line, never a traceback --------------------------------


@pytest.mark.parametrize(
    "damage, message",
    [
        ("empty", "weight file '{w}' is empty; re-save the model with save_pretrained or download it again."),
        ("truncated", "weight file '{w}' is truncated or corrupt: its header describes"),
        (
            "garbage-bin",
            "weight file '{w}' is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)",
        ),
        ("garbage-zip", "cannot read the weights in folder '{d}' (RuntimeError): a weight file is corrupt"),
        ("garbage-pickle", "cannot read the weights in folder '{d}' (UnpicklingError): a weight file is corrupt"),
    ],
)
def test_corrupt_weight_files(tiny_dir, tmp_path, capsys, damage, message):
    import shutil
    import zipfile

    folder = tmp_path / damage
    shutil.copytree(tiny_dir, folder)
    weights = folder / "model.safetensors"
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        weights.unlink()
        weights = folder / "pytorch_model.bin"
        if damage == "garbage-bin":
            weights.write_bytes(b"garbage" * 100)
        elif damage == "garbage-zip":
            with zipfile.ZipFile(weights, "w") as archive:
                archive.writestr("archive/data.pkl", b"garbage" * 10)
        else:
            weights.write_bytes(b"\x80\x02garbage")
    out = tmp_path / "out"
    status, err = run_main(capsys, "classify", str(folder), "--out", str(out), "-q")
    assert status == 1
    line = one_error_line(err)
    assert line.startswith("headclass: error: " + message.format(w=weights, d=folder)), line
    assert "weights_only" not in err and not out.exists()


def test_a_tiny_context_is_one_line(tmp_path, capsys):
    model = save_model(tmp_path / "ctx4", n_positions=4)
    status, err = run_main(capsys, "classify", str(model), "--out", str(tmp_path / "out"), "-q")
    assert status == 1
    assert one_error_line(err).startswith("headclass: error: ")
    assert "context of 4 tokens" in err
    assert not (tmp_path / "out").exists()


def test_a_short_context_shrinks_the_probes_with_one_warning(tmp_path, capsys):
    model = save_model(tmp_path / "ctx6", n_positions=6)
    status, err = run_main(capsys, "classify", str(model), "--out", str(tmp_path / "out"), "-q")
    assert status == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("headclass: warning:")]
    assert len(warnings) == 1 and "context of 6 tokens" in warnings[0] and "shrunk" in warnings[0], err
    assert (tmp_path / "out").is_dir()


# -- 6. --out is checked before the model is loaded ----------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(cli, "_classify_one", refuse)


@pytest.mark.parametrize("case", ["file", "below-a-file", "empty", "unwritable", "unwritable-parent"])
def test_bad_out_fails_before_loading(tmp_path, monkeypatch, capsys, no_loading, case):
    target = tmp_path / "report"
    if case == "file":
        target.write_text("a file")
        out = str(target)
        message = f"--out {out!r} exists and is not a folder; give a folder (new or existing)."
    elif case == "below-a-file":
        target.write_text("a file")
        out = str(target / "sub")
        message = f"--out {out!r} cannot be created: {str(target)!r} is a file, not a folder."
    elif case == "empty":
        out, message = "", "--out is empty; give a folder, e.g. --out report/."
    else:
        folder = target if case == "unwritable" else tmp_path
        target.mkdir()
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode))
        if case == "unwritable":
            out = str(target)
            message = f"--out folder {out!r} is not writable; choose another folder or fix its permissions."
        else:
            out = str(tmp_path / "new")
            message = (
                f"--out {out!r} cannot be created: folder {str(tmp_path)!r} is not writable; "
                "choose another folder or fix its permissions."
            )
    before = snapshot(tmp_path)
    status, err = run_main(capsys, "classify", "tiny", "--out", out, "-q")
    assert status == 1
    assert one_error_line(err) == f"headclass: error: {message}"
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_really_unwritable_out(tmp_path, capsys, no_loading):
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    try:
        status, err = run_main(capsys, "classify", "tiny", "--out", str(target), "-q")
    finally:
        target.chmod(0o700)
    assert status == 1 and "is not writable" in one_error_line(err)


# -- 7. a mistyped path is a missing path, not a hub name ------------------------------------------------


def test_mistyped_relative_path(tiny_dir, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    status, err = run_main(capsys, "classify", "models/tinyy", "--out", "out", "-q")
    assert status == 1
    assert one_error_line(err) == (
        "headclass: error: no such file or folder: 'models/tinyy'. Did you mean 'models/tiny'?"
    )
    status, err = run_main(capsys, "classify", "./tiny", "--out", "out", "-q")
    assert one_error_line(err) == "headclass: error: no such file or folder: './tiny'."
    status, err = run_main(capsys, "classify", "nowhere/at/all", "--out", "out", "-q")
    assert one_error_line(err) == (
        "headclass: error: no such file or folder: 'nowhere/at/all' (folder 'nowhere/at' does not exist either)."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_hub_names_are_still_hub_names(tmp_path, monkeypatch):
    from headclass.loading.sources import looks_like_path

    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("EleutherAI/pythia-160m") and not looks_like_path("gpt2")
    (tmp_path / "models").mkdir()
    assert looks_like_path("models/tinyy") and looks_like_path("a/b/c") and looks_like_path(".x")
    assert looks_like_path("a\\b")


def test_compare_checks_every_source_before_classifying_the_first(tiny_dir, tmp_path, capsys, fast_classify):
    status, err = run_main(capsys, "compare", str(tiny_dir), str(tmp_path / "tinyy"), "--out", str(tmp_path / "o"))
    assert status == 1
    assert one_error_line(err) == f"headclass: error: no such file or folder: {str(tmp_path / 'tinyy')!r}."
    assert fast_classify == [] and list(tmp_path.iterdir()) == []


# -- 10. the manifest: reruns replace their own files, never anyone else's ----------------------------------


def test_manifest_records_the_run(tmp_path, capsys, fast_classify):
    import hashlib

    out = tmp_path / "out"
    assert cli.main(["classify", "tiny", "--out", str(out), "--format", "csv,json", "-q"]) == 0
    doc = json.loads((out / "headclass-run.json").read_text())
    assert doc["kind"] == "headclass.run" and doc["command"] == "classify" and doc["sources"] == ["tiny"]
    assert [f["name"] for f in doc["files"]] == ["tiny.csv", "tiny.json"]
    for entry in doc["files"]:
        assert entry["sha256"] == hashlib.sha256((out / entry["name"]).read_bytes()).hexdigest()
    assert len(doc["config"]["sha256"]) == 64 and doc["date"].endswith("+00:00")
    assert {"headclass", "python", "torch", "transformer_lens", "transformers"} <= set(doc["versions"])


def test_rerun_replaces_its_own_files_and_keeps_everyone_elses(tmp_path, capsys, fast_classify):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["classify", "tiny", "--out", str(out), "--format", "csv,json,md", "-q"]) == 0
    assert cli.main(["classify", "tiny", "--out", str(out), "--format", "csv", "-q"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["headclass-run.json", "notes.txt", "tiny.csv"]
    assert (out / "notes.txt").read_text() == "mine"
    assert "removed 2 files of the previous run" in printed and "tiny.json" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("case", ["not-listed", "edited"])
def test_never_overwrite_a_file_headclass_did_not_write(tmp_path, capsys, fast_classify, case):
    out = tmp_path / "out"
    out.mkdir()
    if case == "not-listed":
        (out / "tiny.md").write_text("my own notes")
    else:
        assert cli.main(["classify", "tiny", "--out", str(out), "--format", "md", "-q"]) == 0
        (out / "tiny.md").write_text("edited by hand")
    capsys.readouterr()
    before = snapshot(tmp_path)
    status, err = run_main(capsys, "classify", "tiny", "--out", str(out), "--format", "csv,md", "-q")
    assert status == 1
    assert one_error_line(err) == (
        f"headclass: error: {str(out / 'tiny.md')!r} exists and was not written by headclass (not listed in "
        f"headclass-run.json); move it away or choose another --out. Nothing in {str(out)!r} was changed."
    )
    assert snapshot(tmp_path) == before


def test_an_edited_stale_file_is_kept(tmp_path, capsys, fast_classify):
    out = tmp_path / "out"
    assert cli.main(["classify", "tiny", "--out", str(out), "--format", "csv,md", "-q"]) == 0
    (out / "tiny.md").write_text("edited by hand")
    assert cli.main(["classify", "tiny", "--out", str(out), "--format", "csv", "-q"]) == 0
    assert "kept tiny.md from the previous run: changed since headclass wrote them" in capsys.readouterr().out
    assert (out / "tiny.md").read_text() == "edited by hand"


# -- 11. read_json names the file --------------------------------------------------------------------------


def test_read_json_bad_value_names_the_file(tiny_taxonomy, tmp_path):
    from headclass.report.export import ExportError, read_json

    path = tmp_path / "t.json"
    tiny_taxonomy.to_json(path)
    doc = json.loads(path.read_text())
    doc["records"][0]["layer"] = "zero"
    path.write_text(json.dumps(doc))
    with pytest.raises(ExportError) as info:
        read_json(path)
    assert str(info.value) == f"{str(path)!r}: column 'layer' (int64) has a value that is not int64: 'zero'."
    doc["records"][0]["layer"] = 0
    doc["records"][0]["induction"] = "high"
    path.write_text(json.dumps(doc))
    with pytest.raises(ExportError, match=r"column 'induction' \(float64\) has a value that is not float64: 'high'"):
        read_json(path)


# -- 12. an unreachable HF_ENDPOINT; GGUF progress on a non-terminal --------------------------------------


def _not_found_server():
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_error(404)

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("endpoint", ["refused", "not-a-hub"])
def test_unreachable_hf_endpoint_names_the_offline_options(tmp_path, endpoint):
    server = _not_found_server() if endpoint == "not-a-hub" else None
    url = f"http://127.0.0.1:{server.server_address[1]}" if server else "http://127.0.0.1:9"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf-home"))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "headclass", "classify", "EleutherAI/pythia-14m", "--out", str(tmp_path / "out")],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        if server:
            server.shutdown()
    assert done.returncode == 1
    line = one_error_line(done.stderr)
    assert line.startswith("headclass: error: cannot "), line
    for hint in ("local Hugging Face folder", ".gguf file", "smollm2-135m", "HF_HUB_OFFLINE"):
        assert hint in line
    assert not (tmp_path / "out").exists()


def test_gguf_progress_bar_only_on_a_terminal(capsys):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from headclass.loading.sources import gguf_progress_on_terminal_only

    real = gguf_utils.tqdm
    with gguf_progress_on_terminal_only():
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert gguf_utils.tqdm is real
    assert capsys.readouterr().err == ""


# -- docs/failure-modes.md lists them all -------------------------------------------------------------


def test_failure_modes_doc_lists_every_message():
    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "failure-modes.md").read_text(encoding="utf-8")
    assert "(docs/failure-modes.md)" in (root / "README.md").read_text(encoding="utf-8")
    for fragment in [
        "--out is empty; give a folder",
        "exists and is not a folder; give a folder (new or existing).",
        "is a file, not a folder.",
        "is not writable; choose another folder or fix its permissions.",
        "it is a folder; move it away or choose another --out. Nothing in",
        "exists and was not written by headclass (not listed in headclass-run.json)",
        "cannot write tiny.html (No space left on device); nothing in",
        "cannot stage the outputs in",
        "cannot publish the outputs to",
        "and restoring",
        "is not a readable headclass manifest",
        "removed N files of the previous run in",
        "changed since headclass wrote them",
        "headclass: interrupted while starting; nothing was written.",
        "headclass: interrupted while loading the model; nothing was written",
        "headclass: interrupted while classifying; nothing was written",
        "headclass: interrupted while writing the outputs; nothing was written",
        "headclass: interrupted after publishing; all N files were written to",
        "headclass: interrupted while sweeping",
        "HEADCLASS_TEST_PAUSE",
        "no such file or folder: 'models/tinyy'. Did you mean 'models/tiny'?",
        "does not exist either",
        "cannot reach the Hugging Face hub",
        "cannot download '...' from the Hugging Face hub at",
        "for its weights in float32 alone, and only 24.0 GB of memory is available: try dtype bfloat16",
        "so it may run out of memory",
        "to load with the 'hooked' backend (HookedTransformer holds 3.8-5.5x its float32 weights",
        "is empty; re-save the model with save_pretrained or download it again.",
        "is truncated or corrupt: its header describes",
        "is not a valid safetensors file (bad header)",
        "is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)",
        "cannot read the weights in folder",
        "weights_only=False",
        "has non-finite weights (NaN or inf): W_Q of layer 0 head 0.",
        "has non-finite weights (NaN or inf) in layer 0 (transformer.h.0.mlp.c_fc.weight)",
        "the attention pattern of layer 1 head 0 is not finite",
        "has rows that do not sum to 1",
        "has a context of 4 tokens",
        "column 'layer' (int64) has a value that is not int64: 'zero'.",
        "EleutherAI-pythia-160m",
        "comparison_counts",
        "progress bar only when stderr is a terminal",
    ]:
        assert fragment in doc, fragment
