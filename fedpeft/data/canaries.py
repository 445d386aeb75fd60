"""Audit canaries: records planted in clients' data, each one in or out with probability 1/2.

For the one-run audit (Steinke, Nasr, Jagielski, NeurIPS 2023; ``fedpeft.privacy.auditing``):
canary ``i`` gets an owner client and a slot in its data. The slot holds the canary when its
secret bit says "in", else a *filler* drawn the same way that is never scored. So every
client's dataset size is the same whatever the bits are: the two worlds differ by replacing
one record, the replace-one adjacency our record-level accounting uses (a client's dataset
size is public in its reply), and the audit compares against that claim.

A canary is a sequence of random pseudo-words (out of distribution, so the model has nothing
else to explain it by; Panda et al., ICLR 2025, random-sequence canaries) and, for
classification, a uniformly random label. Everything is drawn from ``numpy``'s generator seeded
from the run seed in its own domain: reproducible for the auditor; the bits are not a secret
from whoever knows the run config (an audit is run by whoever runs the federation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fedpeft.core.errors import ConfigError
from fedpeft.data.examples import Corpus, Task, TextExample

#: Seed domain of the canaries (so they never share a stream with the split).
CANARY_DOMAIN = 0x6361_6E61
#: Pseudo-words per canary and letters per word.
WORDS, LETTERS = 8, 6
_ALPHABET = np.array(list("bcdfghjklmnpqrstvwxz"))


@dataclass(frozen=True)
class CanarySet:
    """``m`` canaries, their secret inclusion bits, their owners and the fillers."""

    canaries: tuple[TextExample, ...]
    fillers: tuple[TextExample, ...]
    included: tuple[bool, ...]
    owners: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.canaries)

    def planted(self, partition_id: int) -> tuple[TextExample, ...]:
        """What ``partition_id``'s canary slots hold: each of its canaries or its filler."""
        return tuple(c if inc else f for c, f, inc, o in
                     zip(self.canaries, self.fillers, self.included, self.owners, strict=True)
                     if o == partition_id)

    def corpus(self, task: Task, label_names: tuple[str, ...] | None) -> Corpus:
        """Every canary (in and out), in order, for scoring."""
        return Corpus(self.canaries, label_names, task, "audit-canaries")


def _sentence(rng: np.random.Generator) -> str:
    letters = rng.choice(_ALPHABET, size=(WORDS, LETTERS))
    return " ".join("".join(w) for w in letters)


@functools.lru_cache(maxsize=8)
def make_canaries(m: int, *, task: Task, num_labels: int | None, num_partitions: int,
                  seed: int) -> CanarySet:
    """``m`` canaries for a federation of ``num_partitions`` clients (owners uniform)."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(f"audit-canaries={m!r} must be an integer >= 1 (0: no audit)")
    if num_partitions < 1:
        raise ConfigError(f"num_partitions={num_partitions} must be >= 1")
    if task == "classification" and (num_labels is None or num_labels < 2):
        raise ConfigError("classification canaries need the corpus's label names (>= 2)")
    rng = np.random.default_rng([CANARY_DOMAIN, seed])

    def example() -> TextExample:
        label = int(rng.integers(num_labels)) if task == "classification" and num_labels else None
        return TextExample(_sentence(rng), label, "audit-canary")

    canaries = tuple(example() for _ in range(m))
    fillers = tuple(example() for _ in range(m))
    included = tuple(bool(b) for b in rng.random(m) < 0.5)
    owners = tuple(int(o) for o in rng.integers(num_partitions, size=m))
    return CanarySet(canaries, fillers, included, owners)
