"""The HTML report: one self-contained file that a real browser renders, grid figure included.

The browser test runs Debian's ``chromium`` headless on the written file, with every network
feature off, and reads the DOM after the page's scripts ran: the layer x head grid must have
been drawn by plotly (``div#head-grid`` holds a ``plot-container`` with ``svg.main-svg`` and the
heatmap). Without chromium it is skipped with the install step, unless
``HEADCLASS_REQUIRE_CHROMIUM=1`` (set by CI), where it fails.
Install: ``apt-get update && apt-get install -y chromium``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import plotly.graph_objects as go
import pytest
from fake_scores import random_taxonomy

from headclass.errors import HeadclassError
from headclass.report.html import GRID_DIV_ID, render_html_report, write_html_report
from headclass.taxonomy import LABELS, SCORE_COLUMNS, HeadTaxonomy, classify

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture
def tax() -> HeadTaxonomy:
    return random_taxonomy(6, 4, seed=5, model="random <model>", ablation=True)


@pytest.fixture(scope="module")
def tiny_taxonomy(tiny_gpt2) -> HeadTaxonomy:
    return classify(tiny_gpt2, progress=False)


def browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    message = (
        "headless Chromium not installed (Debian: apt-get update && apt-get install -y chromium); "
        "the browser test of the HTML report did not run"
    )
    if os.environ.get("HEADCLASS_REQUIRE_CHROMIUM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def run_chromium(args: list[str], profile: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """Headless Chromium with a fresh profile and no network chatter, given ``args``."""
    cmd = [
        browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        f"--user-data-dir={profile}",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def render_dom(page: Path, profile: Path) -> str:
    """The DOM of ``page`` after its scripts ran, as headless Chromium serialises it."""
    return run_chromium(["--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()], profile).stdout


class _Collector(HTMLParser):
    """Classes of every element inside the element with a given id."""

    def __init__(self, target: str):
        super().__init__()
        self.target, self.depth, self.classes, self.tags, self.texts = target, 0, [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth == 0 and attrs.get("id") == self.target:
            self.depth = 1
            return
        if self.depth:
            if tag not in ("img", "br", "input", "meta", "image", "path", "rect", "line", "use"):
                self.depth += 1
            self.tags.append(tag)
            self.classes += (attrs.get("class") or "").split()

    def handle_startendtag(self, tag, attrs):
        if self.depth:
            self.tags.append(tag)
            self.classes += (dict(attrs).get("class") or "").split()

    def handle_endtag(self, tag):
        if self.depth and tag not in ("img", "br", "input", "meta", "image", "path", "rect", "line", "use"):
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.texts.append(data)


def inside(dom: str, element_id: str) -> _Collector:
    collector = _Collector(element_id)
    collector.feed(dom)
    return collector


def test_report_is_one_self_contained_file(tax, tmp_path):
    out = write_html_report(tax, tmp_path / "report.html")
    assert out == tmp_path / "report.html"
    page = out.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temp file left
    assert page.startswith("<!DOCTYPE html>")
    # plotly.js inline exactly once; nothing fetched from anywhere
    assert page.count("window.Plotly = Plotly") == 1 or page.count("plotly.js v") == 1
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"<link[^>]+href=\"?https?:", page)
    assert f'id="{GRID_DIV_ID}"' in page
    for section in ("summary", "grid", "by-layer", "scores", "per-layer", "heads", "labels", "metadata"):
        assert f'<section id="{section}">' in page
    for label in LABELS:
        assert label in page
    assert "random &lt;model&gt;" in page and "random <model>" not in page.split("<script")[0]
    for score in SCORE_COLUMNS:
        assert f">{score}</th>" in page  # full table header


def test_report_extra_figures(tax, tmp_path):
    extra = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    page = render_html_report(tax, figures={"My extra figure": extra})
    assert "My extra figure" in page and 'id="extra-figure-0"' in page
    with pytest.raises(HeadclassError, match="must be a plotly Figure"):
        render_html_report(tax, figures={"bad": "not a figure"})


def test_report_errors_leave_nothing(tax, tmp_path):
    with pytest.raises(HeadclassError, match="does not exist"):
        write_html_report(tax, tmp_path / "missing" / "r.html")
    with pytest.raises(HeadclassError, match="needs a HeadTaxonomy"):
        write_html_report(tax.table, tmp_path / "r.html")
    assert list(tmp_path.iterdir()) == []


def test_to_html_goes_through_the_report(tiny_taxonomy, tmp_path):
    out = tiny_taxonomy.to_html(tmp_path / "tiny.html")
    assert f'id="{GRID_DIV_ID}"' in Path(out).read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.html"]


@pytest.mark.parametrize("which", ["random", "classified"])
def test_report_renders_in_headless_chromium(which, tax, tiny_taxonomy, tmp_path):
    taxonomy = tax if which == "random" else tiny_taxonomy
    page = write_html_report(taxonomy, tmp_path / "report.html")
    dom = render_dom(page, tmp_path / "profile")
    grid = inside(dom, GRID_DIV_ID)
    assert "plot-container" in grid.classes, "plotly did not draw the head grid"
    assert "main-svg" in grid.classes and "svg" in grid.tags
    assert "hm" in grid.classes or "heatmaplayer" in grid.classes  # the heatmap trace itself
    legend = " ".join(grid.texts)
    for label in set(taxonomy.table["primary_label"]):
        assert label in legend
    # every other figure was drawn too
    for element_id in ("labels-per-layer", "score-heatmaps"):
        assert "main-svg" in inside(dom, element_id).classes


def test_definitions_show_the_thresholds_that_were_used():
    from fake_scores import random_taxonomy

    used = random_taxonomy(metadata={"config": {"thresholds": {"induction": 0.93, "bos": 0.61}}})
    page = render_html_report(used)
    assert "<code>induction &gt;= 0.93</code>" in page and "<code>bos &gt;= 0.61</code>" in page
    # a threshold the metadata does not record is shown as unknown, never as a default
    assert "<code>previous_token &gt;= ?</code>" in page
    assert "<code>previous_token &gt;= 0.4</code>" not in page


def test_definitions_of_a_taxonomy_without_recorded_thresholds():
    from fake_scores import random_taxonomy

    bare = random_taxonomy(metadata={"config": {}})
    page = render_html_report(bare)
    assert "records no thresholds" in page and "<code>induction &gt;= ?</code>" in page
