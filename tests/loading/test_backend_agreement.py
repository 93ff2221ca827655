"""The two TransformerLens generations agree: same processed weights, same attention patterns.

Both generations cannot live in one environment, so each computes a fingerprint
(tests/loading/fingerprint.py) in its own interpreter and the files are compared here.
``make test`` builds the second venv (transformer-lens 3.9.0) and sets HEADCLASS_PEER_PYTHON.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_gpt2, save_tiny_llama, save_tiny_qwen2

PEER = os.environ.get("HEADCLASS_PEER_PYTHON")
SCRIPT = Path(__file__).with_name("fingerprint.py")

pytestmark = pytest.mark.skipif(
    not PEER, reason="set HEADCLASS_PEER_PYTHON to a python with the other TransformerLens generation (make test does)"
)


def fingerprint(python: str, source: Path, out: Path) -> dict:
    result = subprocess.run([python, str(SCRIPT), str(source), str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize(
    "builder", [save_tiny_gpt2, save_tiny_llama, save_tiny_qwen2], ids=["gpt2", "llama-gqa", "qwen2-gqa-biases"]
)
def test_backends_agree_on_weights_and_patterns(tmp_path, builder):
    folder = builder(tmp_path / "model")
    ours = fingerprint(sys.executable, folder, tmp_path / "ours.pt")
    peer = fingerprint(PEER, folder, tmp_path / "peer.pt")
    assert {ours.pop("backend"), peer.pop("backend")} == {"bridge", "hooked"}
    assert ours.keys() == peer.keys()
    for key in ours:
        assert ours[key].shape == peer[key].shape, key
        difference = (ours[key] - peer[key]).abs().max().item()
        assert difference < 1e-5, f"{key}: max abs difference {difference}"
