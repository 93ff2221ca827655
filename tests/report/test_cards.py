"""Head cards (headclass.report.cards): what ``HeadTaxonomy.card`` shows, on planted and real heads.

Planted (tests/planted.py): the copy head's card lists its own tokens first among the raised
tokens; the induction head's examples point at the token after the previous occurrence; every
example of the previous-token head is at offset 1; the no-op head's card says it writes
nothing. ``read_json`` gives the same cards back. SmolLM2: every head has a card, and the top
induction head's K-composition partners include a previous-token head. A screenshot of a real
card (headless Chromium) is written under pytest's tmp path and copied to /tmp/headclass-card.png.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from fake_scores import random_taxonomy
from planted import planted_attention_model, planted_roles_model

import headclass
from headclass.errors import HeadclassError
from headclass.report.cards import CARD_CSS, explain, parse_head
from headclass.report.export import read_json, read_parquet

FAST = {
    "probes": {"repeated": {"n_sequences": 6, "segment_length": 24}, "text": {"n_sequences": 4, "max_tokens": 48}},
    "weights": {"copy_sample_size": 200},
    "uncertainty": {"bootstrap": 20},
}


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    model, roles = planted_attention_model(tmp_path_factory.mktemp("cards-attention"))
    return model, roles, headclass.classify(model, FAST, progress=False)


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    model, roles = planted_roles_model(tmp_path_factory.mktemp("cards-roles"))
    return model, roles, headclass.classify(model, FAST, progress=False)


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts = []

    def handle_data(self, data):
        self.parts.append(data)


def text_of(fragment: str) -> str:
    parser = _Text()
    parser.feed(fragment)
    return " ".join(" ".join(parser.parts).split())


def test_copy_head_card_lists_its_own_tokens_first(output):
    _, roles, tax = output
    card = tax.card(*roles["copy"])
    raised = card.raised_tokens()
    assert len(raised) >= 3
    for source, tokens in raised:
        assert tokens[0] == source
    page = card.to_html()
    first = re.findall(r'<td class="hc-raises"><span class="hc-tok">([^<]*)</span>', page)
    sources = re.findall(r'<tr><td><span class="hc-tok">([^<]*)</span></td><td class="hc-raises">', page)
    assert first == sources and len(first) == len(raised)
    assert "copy_eigen" in page and card.row["output_role"] == "copy"


def test_no_op_head_card_says_it_writes_nothing(output):
    _, roles, tax = output
    card = tax.card(*roles["noop"])
    assert card.writes_nothing
    assert "This head writes nothing" in text_of(card.to_html())
    assert "writes nothing" not in text_of(tax.card(*roles["copy"]).to_html())


def test_induction_and_previous_token_examples(attention):
    _, roles, tax = attention
    induction = tax.card(*roles["induction"])
    examples = induction.examples("repeated")
    assert len(examples) == 5
    evidence = tax.evidence
    for ex in examples:
        assert ex["relation"] == "induction" and ex["weight"] > 0.99
    previous = tax.card(*roles["previous_token"])
    assert all(ex["offset"] == 1 for ex in previous.examples("repeated"))
    page = previous.to_html()
    assert page.count('<tr class="hc-example">') == 5
    assert '<span class="hc-q">' in page and '<span class="hc-k">' in page  # both highlighted
    assert evidence["embedding"] == "effective"


def test_card_shows_roles_scores_budget_partners_and_pattern(attention):
    _, roles, tax = attention
    card = tax.card(*roles["induction"])
    page = card.to_html()
    assert page.startswith(f"<style>{CARD_CSS}</style>")
    assert f'id="head-L{roles["induction"][0]}H{roles["induction"][1]}"' in page
    text = text_of(page)
    row = tax.head(*roles["induction"])
    assert f"attention: {row['attention_role']}" in text and f"output: {row['output_role']}" in text
    assert "confidence" in text and "margin" in text
    assert 'class="hc-bar"' in page  # the budget as one bar
    for score in ("induction", "previous_token", "copy_eigen"):
        assert f"<td>{score}</td>" in page
    assert re.search(r"<td>induction</td><td>[\d.]+</td><td>[\d.]+</td>", page)  # score and SE
    la, ha = roles["previous_token"]
    assert card.evidence["composition"]["k"][0][:2] == [la, ha]
    assert f"L{la}H{ha}" in text and "K-composition" in text
    assert "Ablation" in text and "not computed" in text
    assert '<svg class="hc-pattern"' in page
    assert card._repr_html_() == page
    assert "HeadCard(L1H0" in repr(card)


def test_layer_zero_and_missing_evidence(attention):
    _, _, tax = attention
    assert "no earlier heads" in text_of(tax.card(0, 1).to_html())
    bare = random_taxonomy(3, 2, ablation=True)
    card = bare.card(2, 1)  # no evidence: still a card
    text = text_of(card.to_html())
    assert "no examples collected" in text and "not computed" in text and "ablation_text_dloss" in text
    with pytest.raises(HeadclassError, match="no head at layer 7"):
        bare.card(7, 0)


def test_cards_round_trip_through_json_and_parquet(output, tmp_path):
    _, roles, tax = output
    back = read_json(tax.to_json(tmp_path / "t.json"))
    assert back.equals(tax) and back.evidence == tax.evidence
    assert back.card(*roles["copy"]).to_html() == tax.card(*roles["copy"]).to_html()
    pytest.importorskip("pyarrow")
    again = read_parquet(tax.to_parquet(tmp_path / "t.parquet"))
    assert again.evidence == tax.evidence
    assert tax.relabel({"induction": 0.3}).evidence == tax.evidence
    plain = headclass.classify(output[0], FAST, evidence=False, progress=False)
    assert plain.evidence is None and "evidence" not in (tmp_path / "t.json").read_text()[:0]


def test_explain_combines_card_and_live_pattern(attention):
    model, roles, tax = attention
    result = explain(model, *roles["induction"], taxonomy=tax)
    page = result.to_html()
    assert page.startswith("<!DOCTYPE html>") and 'id="live-pattern"' in page
    assert f'id="head-L{roles["induction"][0]}H{roles["induction"][1]}"' in page
    assert not re.search(r"<script[^>]+src=", page)  # plotly inline: offline
    pytest.importorskip("circuitsvis")
    assert result.circuitsvis is not None and "Live pattern" in result._repr_html_()


def test_parse_head():
    assert parse_head("17.3") == (17, 3) and parse_head("L5H1") == (5, 1)
    with pytest.raises(HeadclassError, match="LAYER.HEAD"):
        parse_head("17:3")
    with pytest.raises(HeadclassError, match=r"layer must be in \[0, 1\]"):
        parse_head("2.0", n_layers=2, n_heads=4)


def test_screenshot_of_a_card(output, tmp_path):
    from test_html import browser

    _, roles, tax = output
    card = tax.card(*roles["copy"])
    page = tmp_path / "card.html"
    page.write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{CARD_CSS}</style></head>"
        f"<body>{card.body_html()}</body></html>",
        encoding="utf-8",
    )
    shot = tmp_path / f"card-{card.id}.png"
    done = subprocess.run(
        [
            browser(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1150,1700",
            "--virtual-time-budget=3000",
            f"--screenshot={shot}",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000
    try:
        shutil.copyfile(shot, "/tmp/headclass-card.png")
    except OSError:
        pass
    print(f"screenshot of the planted copy head's card: {shot} (copied to /tmp/headclass-card.png)")


# -- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_taxonomy(smollm2):
    return headclass.classify(smollm2, FAST, progress=False)


def test_smollm2_every_head_has_a_card(smollm2_taxonomy):
    tax = smollm2_taxonomy
    heads = tax.evidence["heads"]
    assert len(heads) == len(tax) == 270
    for row in tax.table.itertuples():
        card = tax.card(row.layer, row.head)
        assert card.examples("text") and card.evidence["writes"]
    assert tax.evidence["composition"]["computed"] is True


def test_smollm2_top_induction_head_k_composes_with_a_previous_token_head(smollm2_taxonomy):
    tax = smollm2_taxonomy
    table = tax.table
    best = table.loc[table["induction"].idxmax()]
    card = tax.card(int(best["layer"]), int(best["head"]))
    partners = [(la, ha) for la, ha, _ in card.evidence["composition"]["k"]]
    roles = {(int(r.layer), int(r.head)): r for r in table.itertuples()}
    previous = [p for p in partners if roles[p].is_previous_token or roles[p].attention_role == "previous-token"]
    assert previous, [(p, roles[p].attention_role, roles[p].previous_token) for p in partners]


def test_cli_explain_writes_one_page(tmp_path, capsys):
    from planted import ROLES_LAYOUT, ROLES_OV_LAYOUT, build_planted_gpt2, save_planted_tokenizer

    from headclass.cli import main

    folder = tmp_path / "planted-roles"
    hf_model, _ = build_planted_gpt2(ROLES_LAYOUT, ov_layout=ROLES_OV_LAYOUT)
    hf_model.save_pretrained(folder)
    save_planted_tokenizer(folder)
    out = tmp_path / "L1H3.html"
    assert (
        main(
            [
                "explain",
                str(folder),
                "1.3",
                "--prompt",
                "the of and a the of and a",
                "--out",
                str(out),
                "--config",
                str(_fast_config(tmp_path)),
                "-q",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "L1H3 of" in printed and "output copy" in printed and "attending to 'the' raises 'the'" in printed
    page = out.read_text(encoding="utf-8")
    assert 'id="head-L1H3"' in page and 'id="live-pattern"' in page
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["L1H3.html", "fast.yaml"]
    # errors: one line, nothing written
    for argv, message in (
        (["9.3"], "layer must be in [0, 1]"),
        (["1:3"], "LAYER.HEAD"),
        (["1.3", "--out", str(tmp_path / "x.txt")], "must be an .html file"),
    ):
        assert main(["explain", str(folder), *argv, "-q"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("headclass: error:") and message in err and "\n" not in err
    assert not (tmp_path / "x.txt").exists()


def _fast_config(tmp_path):
    import yaml

    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump(FAST))
    return path
