"""Tiny Shakespeare parser/loader: small files plus the shared copy when present."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from fedpeft.core.errors import ConfigError, DataError
from fedpeft.data.errors import MissingDataError
from fedpeft.data.paths import ENV_VAR, data_available, shared_data_path
from fedpeft.data.shakespeare import load_tinyshakespeare, parse_speeches

TOY = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First  Citizen:\nYou are all resolved\nrather to die?\n\n\n"
    "Ghost of A:\n\n"
    "All:\nResolved.\n"
)


def test_parse_speeches() -> None:
    sp = parse_speeches(TOY)
    assert sp == [
        ("First Citizen", "Before we proceed any further, hear me speak."),
        ("All", "Speak, speak."),
        ("First Citizen", "You are all resolved\nrather to die?"),  # name whitespace collapsed
        ("Ghost of A", ""),
        ("All", "Resolved."),
    ]
    assert parse_speeches("") == []


def test_parse_rejects_non_heading() -> None:
    with pytest.raises(DataError, match="line 4 should be a speaker heading"):
        parse_speeches("A:\nhi\n\nnot a heading\nmore\n")


def test_load_toy(tmp_path: Path) -> None:
    p = tmp_path / "s.txt"
    p.write_text(TOY, encoding="utf-8")
    c = load_tinyshakespeare(p)
    assert c.task == "causal_lm" and len(c) == 4  # the empty speech is dropped
    assert c.users == ("First Citizen", "All", "First Citizen", "All")
    assert c.texts[2] == "You are all resolved\nrather to die?"
    assert load_tinyshakespeare(p, min_speeches=2).users == c.users
    with pytest.raises(DataError, match="min_speeches=3"):
        load_tinyshakespeare(p, min_speeches=3)
    with pytest.raises(ConfigError, match="min_speeches=0"):
        load_tinyshakespeare(p, min_speeches=0)
    empty = tmp_path / "e.txt"
    empty.write_text("A:\n\nB:\n", encoding="utf-8")
    with pytest.raises(DataError, match="has no examples"):
        load_tinyshakespeare(empty)


def test_default_path_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(MissingDataError, match="tinyshakespeare.txt"):
        load_tinyshakespeare()


@pytest.mark.skipif(not data_available("tinyshakespeare.txt"),
                    reason="tinyshakespeare.txt not in shared data dir")
def test_real_counts() -> None:
    speeches = parse_speeches(shared_data_path("tinyshakespeare.txt").read_text(encoding="utf-8"))
    assert len(speeches) == 7_222  # README: 7,222 speeches, 308 speakers
    assert len({s for s, _ in speeches}) == 308
    c = load_tinyshakespeare()
    counts = Counter(c.users)
    assert len(c) == 7_097 and len(counts) == 298  # 125 empty headings dropped
    assert sum(v >= 50 for v in counts.values()) == 52  # README: 52 speakers with >= 50 speeches
    big = load_tinyshakespeare(min_speeches=50)
    assert len(set(big.users)) == 52 and len(big) == sum(v for v in counts.values() if v >= 50)
