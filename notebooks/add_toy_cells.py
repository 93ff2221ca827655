"""Append the toy-model cells to notebooks/02_compare_model_sizes.ipynb (idempotent)."""
import sys
import nbformat

path = sys.argv[1] if len(sys.argv) > 1 else "notebooks/02_compare_model_sizes.ipynb"
MARK = "toy-models: induction needs two layers"
nb = nbformat.read(path, as_version=4)
if any(MARK in "".join(c.source) for c in nb.cells):
    print("already there"); sys.exit(0)
md = nbformat.v4.new_markdown_cell
code = nbformat.v4.new_code_cell
cells = [
    md(f"""<!-- {MARK} -->
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
nb.cells.extend(cells)
nbformat.write(nb, path)
print("added", len(cells), "cells")
