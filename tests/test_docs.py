"""The docs name what the code declares: every label, every threshold, every budget class."""

from __future__ import annotations

import re
from pathlib import Path

from headclass.config import load_config
from headclass.scores.patterns import BUDGET_CLASSES
from headclass.taxonomy import LABELS, PRIORITY, RULES

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_labels_page_documents_every_label_and_threshold():
    text = (DOCS / "labels.md").read_text(encoding="utf-8")
    for label in LABELS:
        assert f"`{label}`" in text, label
        if RULES[label].source:
            first_author = RULES[label].source.split()[0]
            assert first_author in text, (label, first_author)
    for key in load_config().thresholds.model_dump():
        assert key in text, key
    for cls in BUDGET_CLASSES:
        assert f"`{cls}`" in text, cls
    # the tie-break list in the docs is the code's, in order
    listed = re.findall(r"^ +\d+\. `([a-z-]+)`$", text, flags=re.MULTILINE)
    assert listed == list(PRIORITY)


def test_reading_a_head_page_exists_and_is_linked():
    assert (DOCS / "reading-a-head.md").is_file()
    assert "reading-a-head.md" in (DOCS / "labels.md").read_text(encoding="utf-8")
