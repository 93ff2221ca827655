"""Every notebook runs top to bottom in a fresh kernel (the venv's Python), in a temporary copy.

Notebooks are committed without outputs; ``notebooks/build_notebooks.py`` writes 01-03.
The kernel is the ``python3`` kernel spec; jupyter_client starts it with ``sys.executable``
(the interpreter running pytest) when the spec's ``argv[0]`` is ``python``, which
``test_kernel_is_this_python`` checks.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
KERNEL = "python3"


def execute(path: Path, workdir: Path, timeout: int = 900) -> "nbformat.NotebookNode":
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    return nb


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_gpt2_head_taxonomy.ipynb", "02_compare_model_sizes.ipynb", "03_copy_heads_explained.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"


def test_kernel_is_this_python(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    path = tmp_path / "probe.ipynb"
    nbformat.write(nb, path)
    out = execute(path, tmp_path, timeout=120)
    printed = out.cells[0].outputs[0]["text"].strip()
    assert os.path.realpath(printed) == os.path.realpath(sys.executable)


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    started = time.perf_counter()
    nb = execute(copy, tmp_path)
    seconds = time.perf_counter() - started
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    print(f"{path.name}: {seconds:.0f} s")
