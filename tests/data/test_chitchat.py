"""Chit-chat loader: small synthetic JSON files plus the real packaged data set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fedpeft.core.errors import ConfigError, DataError
from fedpeft.data.chitchat import (
    chitchat_json_path,
    chitchat_participants,
    chitchat_stats,
    format_example,
    load_chitchat,
)
from fedpeft.data.errors import MissingDataError
from fedpeft.data.partition import partition_natural


def _utt(text: str, sender: str) -> dict[str, str]:
    return {"text": text, "timestamp": "2018-05-02T19:38:15Z", "sender": sender}


def _write(tmp_path: Path, data: Any) -> Path:
    p = tmp_path / "dataset.json"
    p.write_text(json.dumps(data), encoding="utf-8")
    return p


@pytest.fixture()
def toy(tmp_path: Path) -> Path:
    conv_b = {"messages": [[_utt("Hello", "A"), _utt("How are  you?", "A")],
                           [_utt("fine\nthanks", "B")],
                           [_utt("   ", "A")],               # empty turn: dropped
                           [_utt("and you?", "B")],           # merged with B's previous turn
                           [_utt("great", "A")]],
              "prompt": "", "ratings": {}, "start": ""}
    conv_a = {"messages": [[_utt("yo", "C")], [_utt("hi C", "A")]], "prompt": "", "ratings": {}, "start": ""}
    return _write(tmp_path, {"b-conv": conv_b, "a-conv": conv_a})


def test_format_example() -> None:
    assert format_example(None, "hi") == "Assistant: hi"
    assert format_example("hey", "hi") == "User: hey\nAssistant: hi"


def test_toy_examples_and_order(toy: Path) -> None:
    stats = chitchat_stats(toy)
    assert (stats.conversations, stats.participants, stats.examples) == (2, 3, 5)
    assert chitchat_participants(toy) == {"A": 3, "B": 1, "C": 1}
    assert list(chitchat_participants(toy)) == ["A", "B", "C"]  # count desc, then id
    c = load_chitchat(path=toy)
    assert c.task == "causal_lm" and c.label_names is None and c.name == "chitchat"
    # participants by count desc (A, then B/C by id); conversations in id order (a-conv first)
    assert c.users == ("A", "A", "A", "B", "C")
    assert c.texts == (
        "User: yo\nAssistant: hi C",
        "Assistant: Hello How are you?",
        "User: fine thanks and you?\nAssistant: great",
        "User: Hello How are you?\nAssistant: fine thanks and you?",
        "Assistant: yo",
    )


def test_filters_and_sampling(toy: Path) -> None:
    assert set(load_chitchat(min_examples=2, path=toy).users) == {"A"}
    with pytest.raises(DataError, match="min_examples=5"):
        load_chitchat(min_examples=5, path=toy)
    picks = {tuple(dict.fromkeys(load_chitchat(max_participants=2, seed=s, path=toy).users))
             for s in range(20)}
    assert all(len(p) == 2 for p in picks) and len(picks) > 1  # seed changes the sample
    assert (load_chitchat(max_participants=2, seed=3, path=toy)
            == load_chitchat(max_participants=2, seed=3, path=toy))
    for bad in ({"max_participants": 0}, {"min_examples": 0}, {"seed": -1}):
        with pytest.raises(ConfigError):
            load_chitchat(path=toy, **bad)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, "has no examples"),
        ([1, 2], "has no examples"),
        ({"c": {"prompt": ""}}, "no 'messages' list"),
        ({"c": {"messages": ["x"]}}, "not a list"),
        ({"c": {"messages": [[{"text": "hi"}]]}}, "without a sender"),
    ],
)
def test_malformed(tmp_path: Path, data: Any, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_chitchat(path=_write(tmp_path, data))


def test_bad_json_and_missing(tmp_path: Path) -> None:
    p = tmp_path / "dataset.json"
    p.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        load_chitchat(path=p)
    with pytest.raises(MissingDataError, match="nope.json"):
        load_chitchat(path=tmp_path / "nope.json")


# ------------------------------------------------------------- real packaged data (about 2 s)


def test_real_counts() -> None:
    assert chitchat_json_path().name == "dataset.json"
    stats = chitchat_stats()
    assert stats.conversations == 7_168
    assert stats.participants == 1_315
    assert stats.examples == 138_716  # 138,737 raw turns; empty utterances dropped, turns merged
    counts = chitchat_participants()
    assert len(counts) == 1_315 and sum(counts.values()) == stats.examples
    assert list(counts.values()) == sorted(counts.values(), reverse=True)
    assert sum(v >= 50 for v in counts.values()) == 308


def test_real_corpus_natural_federation() -> None:
    c = load_chitchat()
    assert len(c) == 138_716 and len(set(c.users)) == 1_315
    assert all(t.startswith(("User: ", "Assistant: ")) and t.count("\nAssistant: ") <= 1 for t in c.texts)
    parts = partition_natural(c.users)
    assert len(parts) == 1_315
    assert [len(p) for p in parts] == list(chitchat_participants().values())
    sub = load_chitchat(max_participants=50, min_examples=20, seed=1)
    sizes = Counter(sub.users)
    assert len(sizes) == 50 and min(sizes.values()) >= 20
