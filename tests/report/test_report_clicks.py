"""The HTML report's head cards in headless Chromium, clicked as a user would.

A test-only script is injected into a copy of the written report. After plotly has drawn the
grid, it clicks three grid cells (mouse events at the cell's pixel position on plotly's drag
layer, which is what a real click delivers) and three rows of the full head table
(``element.click()``), records after each click which card is visible and how many examples it
shows, and writes the record into the DOM; ``--dump-dom`` hands it back (the screenshot of a
real card is in ``test_cards.py``). A 28 x 12 random taxonomy with fake evidence checks the size
(< 20 MB) of a 336-head report, and prints its load time (recorded in benchmarks/RESULTS.md).

Without chromium the tests skip with the install step (fail with ``HEADCLASS_REQUIRE_CHROMIUM=1``).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from fake_scores import random_taxonomy
from test_html import run_chromium

from headclass.report.html import CARDS_DIV_ID, write_html_report
from headclass.scores.examples import EVIDENCE_VERSION, head_key
from headclass.taxonomy import HeadTaxonomy

CLICKED = [(0, 1), (2, 3), (5, 0)]  # grid cells of the 6 x 4 taxonomy
ROWS = [(1, 2), (3, 0), (4, 3)]  # table rows


def fake_evidence(n_layers: int, n_heads: int, *, n_examples: int = 5, seed: int = 0) -> dict:
    """An evidence document shaped like :func:`headclass.scores.examples.head_evidence`'s."""
    import random

    rng = random.Random(seed)
    vocab = 500
    tokens = {str(i): f" word{i}" for i in range(vocab)}
    prompt = [0] + [rng.randrange(1, vocab) for _ in range(15)]
    heads = {}
    for layer in range(n_layers):
        for head in range(n_heads):
            examples = {}
            for probe in ("text", "repeated"):
                records = []
                for _ in range(n_examples):
                    q = rng.randrange(70, 120)
                    k = q - rng.choice([1, 2, 3, 7, 60])
                    ids = [rng.randrange(1, vocab) for _ in range(q + 9 - max(0, k - 8))]
                    start = max(0, k - 8)
                    records.append(
                        {
                            "seq": rng.randrange(16),
                            "query": q,
                            "key": k,
                            "weight": round(rng.random(), 4),
                            "offset": q - k,
                            "relation": "other",
                            "query_token": ids[q - start],
                            "key_token": ids[k - start],
                            "context": [[start, ids]]
                            if q - k <= 16
                            else [[start, ids[:17]], [q - 8, ids[q - 8 - start :]]],
                            "prefers": [[k, ids[k - start], 0.5], [0, 0, 0.3], [q, ids[q - start], 0.1]],
                        }
                    )
                examples[probe] = records
            writes = [
                {
                    "source": s,
                    "raises": [[rng.randrange(vocab), 1.0] for _ in range(5)],
                    "lowers": [[rng.randrange(vocab), -1.0] for _ in range(5)],
                }
                for s in rng.sample(range(1, vocab), 6)
            ]
            partners = (
                {
                    kind: [[rng.randrange(layer), rng.randrange(n_heads), round(rng.random(), 4)] for _ in range(5)]
                    for kind in "qkv"
                }
                if layer
                else {kind: [] for kind in "qkv"}
            )
            pattern = [[round(rng.random() / (q + 1), 3) for _ in range(q + 1)] for q in range(16)]
            heads[head_key(layer, head)] = {
                "examples": examples,
                "writes": writes,
                "composition": partners,
                "pattern": pattern,
            }
    return {
        "version": EVIDENCE_VERSION,
        "settings": {"n_examples": n_examples},
        "tokens": tokens,
        "embedding": "effective",
        "composition": {"computed": True, "reason": ""},
        "pattern_prompt": {"probe": "text", "tokens": prompt},
        "heads": heads,
    }


def with_evidence(n_layers: int, n_heads: int, seed: int = 0) -> HeadTaxonomy:
    base = random_taxonomy(n_layers, n_heads, seed=seed, model="random-cards")
    return HeadTaxonomy(base.table, base.metadata, evidence=fake_evidence(n_layers, n_heads, seed=seed))


_CLICK_SCRIPT = """
<script>
(function () {
  function visible() {
    var open = Array.from(document.querySelectorAll("#%(cards)s .hc-card")).filter(function (c) { return !c.hidden; });
    return open.map(function (c) { var first = c.querySelector("tr.hc-example td");
                                   return {id: c.id, examples: c.querySelectorAll("tr.hc-example").length,
                                           first: first ? first.textContent : "",
                                           display: getComputedStyle(c).display}; });
  }
  function clickCell(gd, layer, head) {
    var fl = gd._fullLayout, xa = fl.xaxis, ya = fl.yaxis;
    var drag = gd.querySelector(".nsewdrag");
    var box = drag.getBoundingClientRect(), gbox = gd.getBoundingClientRect();
    var x = gbox.left + xa._offset + xa.l2p(head), y = gbox.top + ya._offset + ya.l2p(layer);
    var opts = {bubbles: true, cancelable: true, clientX: x, clientY: y, view: window, buttons: 1};
    drag.dispatchEvent(new MouseEvent("mousemove", opts));
    drag.dispatchEvent(new MouseEvent("mousedown", opts));
    drag.dispatchEvent(new MouseEvent("mouseup", opts));
    drag.dispatchEvent(new MouseEvent("click", opts));
  }
  var log = [], cells = %(cells)s, rows = %(rows)s;
  function finish() {
    var pre = document.createElement("pre"); pre.id = "click-results";
    pre.textContent = JSON.stringify(log); document.body.appendChild(pre);
  }
  function step(i) {
    var gd = document.getElementById("head-grid");
    if (i < cells.length) {
      clickCell(gd, cells[i][0], cells[i][1]);
      setTimeout(function () { log.push({via: "grid", want: cells[i], open: visible()}); step(i + 1); }, 150);
    } else if (i < cells.length + rows.length) {
      var r = rows[i - cells.length];
      var row = document.querySelector('tr.head-row[data-head="L' + r[0] + 'H' + r[1] + '"]');
      row.click();
      log.push({via: "row", want: r, open: visible()});
      step(i + 1);
    } else {
      log.push({via: "search", want: "induction",
                found: window.headclassSearch("induction"), byid: window.headclassSearch("3.2")});
      finish();
    }
  }
  window.addEventListener("load", function () { setTimeout(function () { step(0); }, 300); });
})();
</script>
"""


def check_clicks(tax: HeadTaxonomy, cells, rows, tmp_path: Path) -> list:
    """Click ``cells`` of the grid and ``rows`` of the table in Chromium; check each opens its card."""
    page = write_html_report(tax, tmp_path / "report.html")
    text = page.read_text(encoding="utf-8")
    script = _CLICK_SCRIPT % {"cards": CARDS_DIV_ID, "cells": json.dumps(cells), "rows": json.dumps(rows)}
    clicked = tmp_path / "clicked.html"
    clicked.write_text(text.replace("</body>", script + "</body>"), encoding="utf-8")
    dom = run_chromium(
        ["--window-size=1280,2000", "--virtual-time-budget=10000", "--dump-dom", clicked.resolve().as_uri()],
        tmp_path / "profile",
    ).stdout
    found = re.search(r'<pre id="click-results">(.*?)</pre>', dom, flags=re.S)
    assert found, "the click script did not finish"
    log = json.loads(
        found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    )
    print(json.dumps(log, indent=1))
    assert [e["via"] for e in log[:-1]] == ["grid"] * len(cells) + ["row"] * len(rows)
    for entry in log[:-1]:
        layer, head = entry["want"]
        assert len(entry["open"]) == 1, entry  # exactly one card is open
        card = entry["open"][0]
        assert card["id"] == f"head-L{layer}H{head}", entry
        expected = tax.card(layer, head)
        n_examples = sum(len(v) for v in expected.evidence["examples"].values())
        assert card["display"] != "none" and card["examples"] == n_examples > 0, entry
        strongest = expected.examples()[0]  # that head's own examples
        assert card["first"].split() == [
            expected.token(strongest["query_token"]).strip(),
            f"({strongest['query']})",
            "→",
            expected.token(strongest["key_token"]).strip(),
            f"({strongest['key']})",
        ], entry
    return log


def test_clicks_on_grid_cells_and_table_rows_open_the_matching_card(tmp_path):
    tax = with_evidence(6, 4, seed=3)
    log = check_clicks(tax, CLICKED, ROWS, tmp_path)
    search = log[-1]
    induction = tax.table.query("is_induction")
    assert sorted(search["found"]) == sorted(f"L{r.layer}H{r.head}" for r in induction.itertuples())
    assert search["byid"] == ["L3H2"]


def test_clicks_on_a_classified_planted_report(tmp_path):
    from planted import planted_roles_model

    import headclass

    model, roles = planted_roles_model(tmp_path)
    tax = headclass.classify(
        model,
        {
            "probes": {
                "repeated": {"n_sequences": 4, "segment_length": 16},
                "text": {"n_sequences": 4, "max_tokens": 32},
            },
            "uncertainty": {"bootstrap": 10},
        },
        progress=False,
    )
    check_clicks(tax, [list(roles["copy"]), [0, 1], [1, 0]], [list(roles["noop"]), [0, 0], [0, 3]], tmp_path)


def test_a_336_head_report_is_small_and_opens_fast(tmp_path):
    tax = with_evidence(28, 12, seed=1)
    page = write_html_report(tax, tmp_path / "report.html")
    size = page.stat().st_size
    timed = tmp_path / "timed.html"
    timed.write_text(
        page.read_text(encoding="utf-8").replace(
            "</body>",
            "<script>window.addEventListener('load', function () { var p = document.createElement('pre');"
            " p.id = 'load-ms'; p.textContent = String(performance.now()); document.body.appendChild(p);"
            " });</script></body>",
        ),
        encoding="utf-8",
    )
    started = time.perf_counter()
    dom = run_chromium(["--dump-dom", timed.resolve().as_uri()], tmp_path / "profile").stdout
    wall = time.perf_counter() - started
    load_ms = float(re.search(r'<pre id="load-ms">([\d.]+)</pre>', dom).group(1))
    n_cards = dom.count('class="hc-card"')
    print(
        f"336-head report: {size / 1e6:.1f} MB, load event after {load_ms:.0f} ms "
        f"(chromium start to DOM dump: {wall:.1f} s), {n_cards} cards"
    )
    assert n_cards == 336
    assert size < 20e6
    # the load time is printed and recorded in benchmarks/RESULTS.md, never asserted: timing
    # asserts fail on a loaded machine (tests assert behaviour, benchmarks measure time)
    assert load_ms > 0
