"""Tiny Shakespeare as a per-character causal-LM corpus (LEAF Shakespeare style: client = role).

The file is a sequence of blocks ``"SPEAKER:\\n<lines>\\n\\n"``. :func:`parse_speeches` returns every
block (7,222 speeches by 308 speakers in the public file, 125 of them empty headings such as
``"Ghost of RIVERS:"`` directly followed by another heading); :func:`load_tinyshakespeare` keeps
the 7,097 speeches with text (298 speakers, 52 with >= 50 speeches), one example each
(``text`` = the speech's lines joined by ``"\\n"``, ``user`` = the speaker).
Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018.
"""

from __future__ import annotations

import os
from collections import Counter

from fedpeft.core.errors import ConfigError, DataError
from fedpeft.data.examples import Corpus, TextExample
from fedpeft.data.paths import resolve_path

DEFAULT_FILENAME = "tinyshakespeare.txt"


def parse_speeches(text: str, source: str = "<text>") -> list[tuple[str, str]]:
    """``(speaker, speech)`` pairs in file order; ``speech`` may be empty.

    A speaker line is the first non-blank line of a block and ends with ``":"`` (whitespace in the
    name is collapsed, so "First  Lord" and "First Lord" are one speaker); blocks are
    separated by blank lines. A block whose first line does not end with ``":"`` is malformed.
    """
    speeches: list[tuple[str, str]] = []
    speaker: str | None = None
    lines: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not line:
            if speaker is not None:
                speeches.append((speaker, "\n".join(lines)))
                speaker, lines = None, []
            continue
        if speaker is None:
            if not line.endswith(":") or len(line) < 2:
                raise DataError(
                    f"{source}: line {lineno} should be a speaker heading like 'ROMEO:' "
                    f"but is {line[:60]!r}; is this a Tiny Shakespeare file?"
                )
            speaker = " ".join(line[:-1].split())
        else:
            lines.append(line)
    if speaker is not None:
        speeches.append((speaker, "\n".join(lines)))
    return speeches


def load_tinyshakespeare(path: str | os.PathLike[str] | None = None, min_speeches: int = 1) -> Corpus:
    """Causal-LM corpus, one example per non-empty speech, ``user`` = speaking character.

    Speakers with fewer than ``min_speeches`` non-empty speeches are dropped. Examples keep file
    order. ``path`` defaults to ``shared_data_path("tinyshakespeare.txt")``.
    """
    if min_speeches < 1:
        raise ConfigError(f"min_speeches={min_speeches!r} must be >= 1.")
    p = resolve_path(path, DEFAULT_FILENAME)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text ({e}); pass a Tiny Shakespeare text file.") from e
    speeches = [(s, t) for s, t in parse_speeches(text, str(p)) if t]
    if not speeches:
        raise DataError(f"{p} has no examples (no speech with text); pass a Tiny Shakespeare text file.")
    counts = Counter(s for s, _ in speeches)
    examples = tuple(TextExample(t, None, s) for s, t in speeches if counts[s] >= min_speeches)
    if not examples:
        raise DataError(
            f"no speaker in {p} has min_speeches={min_speeches} speeches "
            f"(most: {max(counts.values())}); lower min_speeches."
        )
    return Corpus(examples, None, "causal_lm", "tinyshakespeare")
