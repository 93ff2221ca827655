"""Print-free helper run as a script: load a model with headclass and save its fingerprint.

Usage: python fingerprint.py SOURCE OUT.pt [BACKEND]

The fingerprint holds the processed per-head weights and the attention patterns of every layer
on fixed tokens. The backend-agreement test runs this script under two interpreters (one per
TransformerLens generation) and compares the files, since both generations cannot share one
environment.
"""

import sys

import torch

import headclass


def fingerprint(source: str, backend: str = "auto") -> dict:
    model = headclass.load_model(source, backend=backend)
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, model.d_vocab, (2, 24), generator=generator)
    patterns = {}
    model.run_with_patterns(tokens, lambda layer, p: patterns.__setitem__(layer, p.clone()))
    out = {f"pattern.{layer}": p for layer, p in patterns.items()}
    for key in ("W_Q", "W_K", "W_V", "W_O", "W_E", "W_U"):
        out[key] = getattr(model, key).clone()
    out["backend"] = model.backend
    return out


if __name__ == "__main__":
    torch.save(fingerprint(sys.argv[1], *(sys.argv[3:4] or ["auto"])), sys.argv[2])
