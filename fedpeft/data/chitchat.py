"""The CCC chit-chat data set (``chitchat-dataset`` wheel) as a per-participant causal-LM corpus.

The wheel ships ``chitchat_dataset/dataset.json``: ``{conv_id: {"messages": [[utterance, ...],
...], "prompt", "ratings", "start"}}`` where each inner list is one *turn* (consecutive
utterances ``{"text", "timestamp", "sender"}`` of one sender). 7,168 conversations between
1,315 participants. We read the JSON directly (not the package's classes).

Example format (one example per turn, ``user`` = the turn's sender)::

    User: <previous turn of the other speaker>
    Assistant: <this sender's turn>

Utterances of a turn are joined with a single space and whitespace is collapsed. The opening turn
of a conversation has no context and is formatted as ``"Assistant: <turn>"``. Empty utterances are
dropped; turns left empty are dropped and adjacent turns of the same sender are merged.

The natural federation is one client per participant (:func:`fedpeft.data.partition.partition_natural`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.core.errors import ConfigError, DataError
from fedpeft.data.errors import MissingDataError
from fedpeft.data.examples import Corpus, TextExample

USER_PREFIX = "User: "
ASSISTANT_PREFIX = "Assistant: "

# (sender, text) turns of one conversation
_Turn = tuple[str, str]


def chitchat_json_path() -> Path:
    """Location of ``dataset.json`` inside the installed ``chitchat-dataset`` package."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            "package 'chitchat_dataset' is not installed (searched: the Python path); "
            "install chitchat-dataset==0.9.0 or pass path= to load_chitchat."
        )
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / "dataset.json"
        if candidate.is_file():
            return candidate
    raise MissingDataError(
        f"chitchat_dataset/dataset.json not found; searched: {list(spec.submodule_search_locations)}. "
        "Reinstall chitchat-dataset==0.9.0 or pass path= to load_chitchat."
    )


def format_example(context: str | None, response: str) -> str:
    """The chat text of one example (see module docstring)."""
    if context is None:
        return f"{ASSISTANT_PREFIX}{response}"
    return f"{USER_PREFIX}{context}\n{ASSISTANT_PREFIX}{response}"


def _clean(text: Any) -> str:
    return " ".join(text.split()) if isinstance(text, str) else ""


def _parse_conversation(conv_id: str, conv: Any, path: Path) -> tuple[_Turn, ...]:
    if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list):
        raise DataError(f"{path}: conversation {conv_id!r} has no 'messages' list; the file is malformed.")
    turns: list[_Turn] = []
    for turn in conv["messages"]:
        if not isinstance(turn, list):
            raise DataError(f"{path}: conversation {conv_id!r} has a turn that is not a list: {turn!r}.")
        for utt in turn:
            if not isinstance(utt, dict) or not isinstance(utt.get("sender"), str) or not utt["sender"]:
                raise DataError(
                    f"{path}: conversation {conv_id!r} has an utterance without a sender: {utt!r}."
                )
            text = _clean(utt.get("text"))
            if not text:
                continue
            sender = utt["sender"]
            if turns and turns[-1][0] == sender:
                turns[-1] = (sender, f"{turns[-1][1]} {text}")
            else:
                turns.append((sender, text))
    return tuple(turns)


@functools.lru_cache(maxsize=4)
def _read_conversations(path: Path) -> tuple[tuple[str, tuple[_Turn, ...]], ...]:
    """Conversations sorted by id, each a tuple of (sender, text) turns."""
    try:
        with path.open(encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); reinstall chitchat-dataset or fix the file.") from e
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path} has no examples: expected a non-empty object of conversations.")
    return tuple((cid, _parse_conversation(cid, raw[cid], path)) for cid in sorted(raw))


def _resolve(path: str | os.PathLike[str] | None) -> Path:
    if path is None:
        return chitchat_json_path()
    p = Path(path)
    if not p.is_file():
        raise MissingDataError(f"chitchat path={str(p)!r} does not exist; pass the path of a dataset.json.")
    return p.resolve()


def _examples_by_participant(path: Path) -> dict[str, list[TextExample]]:
    by_user: dict[str, list[TextExample]] = {}
    for _cid, turns in _read_conversations(path):
        prev: str | None = None
        for sender, text in turns:
            by_user.setdefault(sender, []).append(TextExample(format_example(prev, text), None, sender))
            prev = text
    return by_user


@dataclass(frozen=True)
class ChitchatStats:
    conversations: int
    participants: int
    examples: int


def chitchat_stats(path: str | os.PathLike[str] | None = None) -> ChitchatStats:
    """Counts of conversations, participants (senders) and turn examples."""
    p = _resolve(path)
    convs = _read_conversations(p)
    counts = Counter(sender for _cid, turns in convs for sender, _ in turns)
    return ChitchatStats(len(convs), len(counts), sum(counts.values()))


def chitchat_participants(path: str | os.PathLike[str] | None = None) -> dict[str, int]:
    """Examples (turns) per participant, ordered by count descending then sender id."""
    p = _resolve(path)
    counts = Counter(sender for _cid, turns in _read_conversations(p) for sender, _ in turns)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def load_chitchat(
    max_participants: int | None = None,
    min_examples: int = 1,
    seed: int = 0,
    *,
    path: str | os.PathLike[str] | None = None,
) -> Corpus:
    """Causal-LM corpus of chit-chat turns, ``user`` = sender id.

    Participants with fewer than ``min_examples`` turns are dropped. If ``max_participants`` is
    set and smaller than the number left, a uniformly random subset of that size is drawn with
    ``numpy.random.default_rng(seed)``. Examples are grouped by participant, participants ordered
    by number of examples descending (ties by id); within a participant, conversations are in id
    order and turns in conversation order.
    """
    if max_participants is not None and max_participants < 1:
        raise ConfigError(f"max_participants={max_participants!r} must be >= 1 or None (all participants).")
    if min_examples < 1:
        raise ConfigError(f"min_examples={min_examples!r} must be >= 1.")
    if seed < 0:
        raise ConfigError(f"seed={seed!r} must be >= 0.")
    p = _resolve(path)
    by_user = _examples_by_participant(p)
    eligible = sorted((u for u, exs in by_user.items() if len(exs) >= min_examples),
                      key=lambda u: (-len(by_user[u]), u))
    if not eligible:
        raise DataError(
            f"no chitchat participant has min_examples={min_examples} examples "
            f"(largest has {max(map(len, by_user.values()), default=0)}); lower min_examples."
        )
    if max_participants is not None and max_participants < len(eligible):
        rng = np.random.default_rng(seed)
        keep = set(rng.choice(len(eligible), size=max_participants, replace=False).tolist())
        eligible = [u for i, u in enumerate(eligible) if i in keep]
    examples = tuple(ex for u in eligible for ex in by_user[u])
    return Corpus(examples, None, "causal_lm", "chitchat")
