"""Publishing --out all or nothing under injected faults (issue 11, item 3).

Every file operation on the test's folder (open, os.open, os.replace, os.rename, os.mkdir,
os.fsync, os.chmod, os.unlink, os.rmdir) is counted during a clean run; then the run is
repeated with the k-th operation failing, for every k, with a plain OSError and with ENOSPC.
Each time the command exits 1 with one line, and the folder (and its parent) is byte for byte
as before: no new file, no lost file, no staging folder.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
from pathlib import Path

import pytest
from test_failures import one_error_line, renamed, save_model, snapshot

from headclass import cli
from headclass.atomic import FolderPublication, PublishError

_OPS = [
    (os, "replace"),
    (os, "rename"),
    (os, "mkdir"),
    (os, "open"),
    (os, "fsync"),
    (os, "chmod"),
    (os, "unlink"),
    (os, "rmdir"),
    (builtins, "open"),
]


class Faults:
    """Counts file operations under ``root`` and makes the ``fail_at``-th one raise ``error``."""

    def __init__(self, root: Path, fail_at: int | None = None, error: BaseException | None = None):
        self.root = str(root)
        self.fail_at = fail_at
        self.error = error
        self.count = 0
        self.failed: list[str] = []

    def _ours(self, name: str, args: tuple) -> bool:
        if name == "fsync":
            return True
        first = args[0] if args else None
        if isinstance(first, int) or first is None:
            return False
        try:
            return os.path.abspath(os.fspath(first)).startswith(self.root)
        except TypeError:
            return False

    def install(self, monkeypatch) -> "Faults":
        for module, name in _OPS:
            real = getattr(module, name)

            def wrapper(*args, _real=real, _name=name, **kwargs):
                if self._ours(_name, args) and "dir_fd" not in kwargs:
                    self.count += 1
                    if self.count == self.fail_at:
                        self.failed.append(f"{_name}{args[:2]!r}")
                        raise self.error
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, wrapper)
        return self


@pytest.fixture(scope="module")
def tiny_taxonomy(tmp_path_factory):
    import headclass

    model = save_model(tmp_path_factory.mktemp("models") / "tiny")
    return headclass.classify(headclass.load_model(model), progress=False)


@pytest.fixture
def instant(monkeypatch, tiny_taxonomy):
    monkeypatch.setattr(
        cli, "_classify_one", lambda source, config, args, status, run, ablation=False: renamed(tiny_taxonomy, "tiny")
    )


def _setup(case: str, base: Path) -> Path:
    """A fresh folder tree for ``case``; returns --out."""
    if base.exists():
        shutil.rmtree(base)
    base.mkdir()
    (base / "other.txt").write_text("someone else's file")
    if case == "new":
        return base / "out"
    if case == "new-with-parents":
        return base / "a" / "b" / "out"
    out = base / "out"
    # a previous run (csv, json, md) and a file headclass never wrote
    assert cli.main(["classify", "tiny", "--out", str(out), "--format", "csv,json,md", "-q"]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "tiny.csv").write_text("stale content written by a previous headclass run\n")
    return out


def _rewrite_manifest_hash(out: Path) -> None:
    """After _setup edited tiny.csv by hand, make the manifest own it again (a previous run)."""
    import hashlib
    import json

    manifest = out / "headclass-run.json"
    doc = json.loads(manifest.read_text())
    for entry in doc["files"]:
        entry["sha256"] = hashlib.sha256((out / entry["name"]).read_bytes()).hexdigest()
    manifest.write_text(json.dumps(doc))


ARGS = ["--format", "csv,json", "-q"]


@pytest.mark.parametrize("case", ["new", "new-with-parents", "existing"])
@pytest.mark.parametrize("kind", ["oserror", "enospc"])
def test_every_failing_file_operation_leaves_out_as_it_was(tmp_path, monkeypatch, capsys, instant, case, kind):
    base = tmp_path / "tree"
    out = _setup(case, base)
    if case == "existing":
        _rewrite_manifest_hash(out)
    with monkeypatch.context() as patch:  # the clean run: count the operations
        counter = Faults(base).install(patch)
        assert cli.main(["classify", "tiny", "--out", str(out), *ARGS]) == 0
    n_ops = counter.count
    assert n_ops > 10
    clean = snapshot(out)
    assert sorted(clean) == sorted(
        ["headclass-run.json", "tiny.csv", "tiny.json"] + (["notes.txt"] if case == "existing" else [])
    )
    capsys.readouterr()

    for k in range(1, n_ops + 1):
        out = _setup(case, base)
        if case == "existing":
            _rewrite_manifest_hash(out)
        before = snapshot(base)
        error = (
            OSError(errno.ENOSPC, "No space left on device")
            if kind == "enospc"
            else OSError(errno.EIO, "Input/output error")
        )
        with monkeypatch.context() as patch:
            faults = Faults(base, fail_at=k, error=error).install(patch)
            status = cli.main(["classify", "tiny", "--out", str(out), *ARGS])
        err = capsys.readouterr().err
        assert faults.failed, f"operation {k} of {n_ops} never ran"
        assert status == 1, f"k={k} ({faults.failed[0]}): exit {status}"
        line = one_error_line(err)
        assert line.startswith("headclass: error: ") and error.strerror in line, (k, faults.failed, line)
        assert snapshot(base) == before, f"k={k}: {faults.failed[0]} changed the tree"


def test_a_previous_run_is_replaced_completely(tmp_path, capsys, instant):
    out = _setup("existing", tmp_path / "tree")
    _rewrite_manifest_hash(out)
    assert cli.main(["classify", "tiny", "--out", str(out), *ARGS]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["headclass-run.json", "notes.txt", "tiny.csv", "tiny.json"]
    assert "stale" not in (out / "tiny.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "tree").iterdir()) == ["other.txt", "out"]


# -- the publisher on its own ---------------------------------------------------------------------------


def _publish(out: Path, files: dict[str, str], *, owned=(), remove=()) -> list[str]:
    with FolderPublication(out, owned=owned) as publication:
        for name, text in files.items():
            publication.path(name).write_text(text)
        return publication.commit(remove=remove)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_publisher_rolls_back_at_every_step(tmp_path, monkeypatch, error):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.txt", "b.txt", "gone.txt", "user.txt"):
        (out / name).write_text(f"old {name}")
    files = {"a.txt": "new a", "b.txt": "new b", "c.txt": "new c"}
    owned = {"a.txt", "b.txt", "gone.txt"}
    before = snapshot(tmp_path)
    with monkeypatch.context() as patch:
        counter = Faults(tmp_path).install(patch)
        _publish(out, files, owned=owned, remove=["gone.txt"])
    after = snapshot(out)
    assert after == {"a.txt": b"new a", "b.txt": b"new b", "c.txt": b"new c", "user.txt": b"old user.txt"}
    for k in range(1, counter.count + 1):
        shutil.rmtree(out)
        out.mkdir()
        for name in ("a.txt", "b.txt", "gone.txt", "user.txt"):
            (out / name).write_text(f"old {name}")
        with monkeypatch.context() as patch:
            Faults(tmp_path, fail_at=k, error=error).install(patch)
            with pytest.raises((PublishError, KeyboardInterrupt)):
                _publish(out, files, owned=owned, remove=["gone.txt"])
        assert snapshot(tmp_path) == before, k


def test_publisher_refuses_to_replace_what_it_does_not_own(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("user's")
    with pytest.raises(PublishError, match="exists and was not written by headclass"):
        _publish(out, {"a.txt": "new"})
    assert snapshot(tmp_path) == {"out": "<dir>", "out/a.txt": b"user's"}


def test_a_failed_rollback_keeps_the_previous_files_and_says_where(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old a")
    real = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] in (3, 4):  # fail the second move in, then its rollback
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    with FolderPublication(out, owned={"a.txt"}) as publication:
        publication.path("a.txt").write_text("new a")
        publication.path("b.txt").write_text("new b")
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(PublishError, match="the previous files are in"):
            publication.commit()
        monkeypatch.undo()
    assert (out / "a.txt").exists() or any(p.name == "a.txt" for p in out.rglob("a.txt"))


def test_path_names_must_be_plain(tmp_path):
    with FolderPublication(tmp_path / "out") as publication:
        for bad in ("", ".", "..", "a/b", ".headclass-staging-x"):
            with pytest.raises(PublishError, match="plain file name"):
                publication.path(bad)
    assert list(tmp_path.iterdir()) == []
