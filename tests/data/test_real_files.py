"""The shared benchmark TSVs (skipped cleanly where ../shared/data or FEDPEFT_DATA_DIR lacks them)."""

from __future__ import annotations

from collections import Counter

import pytest

from fedpeft.data.paths import data_available, shared_data_path
from fedpeft.data.textfiles import AGNEWS_LABELS, load_text_classification


def _need(filename: str) -> None:
    if not data_available(filename):
        pytest.skip(f"{filename} not found in the shared data dir (set FEDPEFT_DATA_DIR to run this test)")


@pytest.mark.parametrize(
    ("filename", "rows", "positives"), [("sst2_train.tsv", 60_614, 33_828), ("sst2_dev.tsv", 6_735, 3_741)]
)
def test_sst2(filename: str, rows: int, positives: int) -> None:
    _need(filename)
    c = load_text_classification(shared_data_path(filename))
    assert len(c) == rows and c.label_names == ("0", "1")
    assert sum(c.labels) == positives
    assert all(t == t.strip() and t for t in c.texts)


@pytest.mark.parametrize(
    ("filename", "counts", "quoted"),
    [
        # README says 10,000 rows; the file has 10,001 (no header, every line a valid row)
        ("agnews_dev.tsv", {0: 2509, 1: 2458, 2: 2496, 3: 2538}, 397),
        ("agnews_test.tsv", {0: 1900, 1: 1900, 2: 1900, 3: 1900}, 278),
    ],
)
def test_agnews(filename: str, counts: dict[int, int], quoted: int) -> None:
    _need(filename)
    c = load_text_classification(shared_data_path(filename))
    assert c.label_names == AGNEWS_LABELS
    assert dict(Counter(c.labels)) == counts
    # CSV-style quoting is undone: quotes survive as text, no doubled quotes remain
    assert sum('"' in t for t in c.texts) == quoted
    assert not any('""' in t for t in c.texts)
