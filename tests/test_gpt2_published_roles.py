"""GPT-2 small's published head roles, found again by headclass.

Heads are ``layer.head``. The roles and where they were published:

* previous-token 4.11 and 2.2 -- Wang et al. 2022, *Interpretability in the Wild* (IOI);
* induction 5.1, 5.5, 6.9, 7.2, 7.10 -- IOI; ARENA 1.2 (induction heads in GPT-2 small);
* duplicate-token 0.1 and 3.0 -- IOI;
* name movers 9.6, 9.9, 10.0 copy (positive top-k copy score) -- IOI;
* successor head 9.1 -- Gould et al. 2023, *Successor Heads*;
* negative name movers / copy suppression 10.7 and 11.10 -- IOI; McDougall et al. 2023,
  *Copy Suppression*.

What "found" means (:func:`check_published_roles`): each listed head ranks among the top heads
of the score that defines its role, AND carries the role's label (``is_<label>``) under the
default thresholds. "Top" is top 10 of the 144 heads (7 %) for roles GPT-2 small has few of
(previous-token, duplicate-token, copy suppression), and top 15 (10 %) for roles it has many
more of than the papers list: GPT-2 small has further induction-like heads in layers 5-8 and
many copying heads in layers 9-11 (the IOI paper's backup name movers), so a tighter cut would
fail for heads that do the job but were not the ones a paper studied. A head drawn at random
passes a top-10 / top-15 rank with probability 0.07 / 0.10, so the rank condition is far from
vacuous.

The copy scores are taken on the *effective* embedding (tokens passed through block 0's MLP),
as in the IOI paper: GPT-2's later heads read tokens after MLP 0, not raw ``W_E``.

The test on real GPT-2 small runs whenever its weights are at hand: a ``save_pretrained``
folder named by ``$HEADCLASS_GPT2_DIR``, or ``gpt2`` in the local Hugging Face cache. Without
them it is skipped with that reason; nothing is downloaded.

The checker itself is tested on a GPT-2-shaped model (12 x 12 heads) with every role planted at
its published position (``tests/toy_fixtures.py``): it must pass there, and must name the head
when one role is left out.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from toy_fixtures import GPT2_SMALL_LAYOUT, planted_gpt2_roles_model

import headclass
from headclass.taxonomy import HeadTaxonomy, classify, flag_column


@dataclass(frozen=True)
class PublishedRole:
    """A head role a paper reported, and how headclass should see it.

    ``label``: the taxonomy label the heads must carry; ``score``: the table column that ranks
    heads for it; ``heads``: ``(layer, head)`` pairs; ``top``: the rank (1 = highest score)
    each head must reach; ``source``: where it was published.
    """

    label: str
    score: str
    heads: tuple[tuple[int, int], ...]
    top: int
    source: str


GPT2_SMALL_ROLES: tuple[PublishedRole, ...] = (
    PublishedRole("previous-token", "previous_token", ((4, 11), (2, 2)), 10, "Wang et al. 2022 (IOI)"),
    PublishedRole(
        "induction", "induction", ((5, 1), (5, 5), (6, 9), (7, 2), (7, 10)), 15, "Wang et al. 2022 (IOI); ARENA 1.2"
    ),
    PublishedRole("duplicate-token", "duplicate_token", ((0, 1), (3, 0)), 10, "Wang et al. 2022 (IOI)"),
    PublishedRole("copy", "copy_topk", ((9, 6), (9, 9), (10, 0)), 15, "Wang et al. 2022 (IOI), name movers"),
    PublishedRole(
        "copy-suppression",
        "copy_suppression_topk",
        ((10, 7), (11, 10)),
        10,
        "Wang et al. 2022 (IOI), negative name movers; McDougall et al. 2023",
    ),
    PublishedRole("successor", "successor", ((9, 1),), 10, "Gould et al. 2023 (successor heads)"),
)

#: The roles the 12 x 12 planted GPT-2 below can carry: it has no tokenizer, hence no ordinal
#: tokens and no successor score (the successor score has its own planted head in
#: tests/planted.py, ``planted_roles_model``).
PLANTABLE_ROLES = tuple(role for role in GPT2_SMALL_ROLES if role.label != "successor")

#: Config for GPT-2 small: copy scores on the effective embedding, as in the IOI paper.
GPT2_CONFIG = {"weights": {"effective_embedding": True}}


def check_published_roles(taxonomy: HeadTaxonomy, roles=GPT2_SMALL_ROLES) -> list[str]:
    """Every way ``taxonomy`` disagrees with the published ``roles``, one line each.

    A head fails when it is not in the table, when its score is NaN or ranks below
    ``role.top`` among all heads, or when it lacks the role's label. Its rank is the number of
    heads scoring at least as high, itself included: a tie takes the worse rank, so a head
    tied with a hundred idle heads is not "top 15". Lines start with the head as
    ``layer.head``. An empty list means every published role was found.
    """
    table = taxonomy.table
    n_heads = len(table)
    indexed = table.set_index(["layer", "head"])
    failures = []
    for role in roles:
        flag = flag_column(role.label)
        column = table[role.score]
        for layer, head in role.heads:
            name = f"{layer}.{head} ({role.label}, {role.source})"
            if (layer, head) not in indexed.index:
                failures.append(f"{name}: not in the taxonomy of {n_heads} heads")
                continue
            row = indexed.loc[(layer, head)]
            value = float(row[role.score])
            if math.isnan(value):
                failures.append(f"{name}: {role.score} is NaN")
                continue
            rank = int((column >= value).sum())
            if rank > role.top:
                failures.append(f"{name}: {role.score} = {value:.3f} ranks {rank} of {n_heads}; needs top {role.top}")
            if not bool(row[flag]):
                failures.append(
                    f"{name}: not labelled {role.label!r} ({flag} is False; {role.score} = {value:.3f}, "
                    f"labels: {row['labels'] or 'none'})"
                )
    return failures


# -- the checker, on planted roles ------------------------------------------------------------


@pytest.fixture(scope="session")
def planted_roles_taxonomy(tmp_path_factory) -> HeadTaxonomy:
    model = planted_gpt2_roles_model(tmp_path_factory.mktemp("planted-roles"))
    return classify(model, progress=False)


@pytest.mark.slow
def test_checker_passes_when_every_role_is_planted(planted_roles_taxonomy):
    assert check_published_roles(planted_roles_taxonomy, PLANTABLE_ROLES) == []


@pytest.mark.slow
def test_checker_names_the_head_left_unplanted(tmp_path):
    layout = {pos: recipe for pos, recipe in GPT2_SMALL_LAYOUT.items() if pos != (7, 10)}
    model = planted_gpt2_roles_model(tmp_path, layout)
    failures = check_published_roles(classify(model, progress=False), PLANTABLE_ROLES)
    assert failures, "the checker passed a model whose head 7.10 does nothing"
    assert all(line.startswith("7.10 (induction") for line in failures), failures
    assert any("ranks" in line for line in failures) and any("not labelled" in line for line in failures)


@pytest.mark.slow
def test_checker_reports_rank_and_label_separately(planted_roles_taxonomy):
    table = planted_roles_taxonomy.table.copy()
    at = (table["layer"] == 9) & (table["head"] == 6)
    table.loc[at, "is_copy"] = False  # label lost, score still top
    at = (table["layer"] == 0) & (table["head"] == 1)
    table.loc[at, "duplicate_token"] = 0.0  # score sinks, label kept
    failures = check_published_roles(HeadTaxonomy(table, dict(planted_roles_taxonomy.metadata)), PLANTABLE_ROLES)
    assert len(failures) == 2, failures
    assert failures[0].startswith("0.1 (duplicate-token") and "ranks" in failures[0]
    assert failures[1].startswith("9.6 (copy") and "not labelled 'copy'" in failures[1]


@pytest.mark.slow
def test_checker_reports_a_head_the_model_lacks(planted_roles_taxonomy):
    small = planted_roles_taxonomy.table.query("layer < 6")
    failures = check_published_roles(HeadTaxonomy(small.reset_index(drop=True), {}), PLANTABLE_ROLES)
    missing = [line for line in failures if "not in the taxonomy" in line]
    assert {line.split()[0] for line in missing} == {"6.9", "7.2", "7.10", "9.6", "9.9", "10.0", "10.7", "11.10"}


# -- real GPT-2 small ---------------------------------------------------------------------------


def _gpt2_source():
    """A source for GPT-2 small that needs no network, or None."""
    folder = os.environ.get("HEADCLASS_GPT2_DIR")
    if folder:
        return Path(folder).expanduser()
    from headclass.loading.sources import is_cached_on_hub

    return "gpt2" if is_cached_on_hub("gpt2") else None


@pytest.mark.slow
def test_gpt2_small_published_roles():
    source = _gpt2_source()
    if source is None:
        pytest.skip(
            "GPT-2 small weights not available: set HEADCLASS_GPT2_DIR to a save_pretrained "
            "folder of gpt2, or put 'gpt2' in the Hugging Face cache"
        )
    if isinstance(source, Path) and not (source / "config.json").is_file():
        pytest.fail(f"HEADCLASS_GPT2_DIR={str(source)!r} is not a Hugging Face model folder")
    model = headclass.load_model(source if isinstance(source, str) else str(source), name="gpt2-small")
    assert (model.n_layers, model.n_heads) == (12, 12), "HEADCLASS_GPT2_DIR must hold GPT-2 small"
    failures = check_published_roles(classify(model, GPT2_CONFIG, progress=False))
    assert not failures, "GPT-2 small's published roles not found:\n" + "\n".join(failures)
