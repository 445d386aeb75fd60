"""Client partitions over example indices (pure functions; randomness passed in as a Generator).

We do not depend on ``flwr-datasets``: it needs Hugging Face ``datasets`` and ``pyarrow`` even for
in-memory lists. These small partitioners work on index lists instead, so any :class:`Corpus` (or
plain label/user sequences) can be split without a framework.

* natural: one client per user (LEAF-style; chit-chat participants, Shakespeare roles);
* iid: a uniform random split into near-equal parts;
* dirichlet: label skew of Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification", 2019, as used by FedNLP (Lin et al., 2022):
  for each class, client proportions ~ Dir(alpha); small alpha = strong skew.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedpeft.core.errors import ConfigError, DataError, UnknownNameError
from fedpeft.data.examples import Corpus

Partitions = list[list[int]]


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(
            f"rng={rng!r} must be a numpy.random.Generator; pass numpy.random.default_rng(seed)."
        )
    return rng


def partition_natural(
    users: Sequence[str | None], *, min_examples: int = 1, max_clients: int | None = None
) -> Partitions:
    """One partition per user: indices of that user's examples, ascending.

    Users with fewer than ``min_examples`` examples are dropped; examples without a user are not
    assigned. Clients are ordered by size descending, ties by user id, so ``max_clients`` keeps the
    largest users.
    """
    if min_examples < 1:
        raise ConfigError(f"min_examples={min_examples!r} must be >= 1.")
    if max_clients is not None and max_clients < 1:
        raise ConfigError(f"max_clients={max_clients!r} must be >= 1 or None (all users).")
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(users):
        if u is not None:
            groups.setdefault(u, []).append(i)
    if not groups:
        raise DataError(
            f"natural partition needs user ids, but none of the {len(users)} examples has one; "
            "use the 'iid' or 'dirichlet' partitioner."
        )
    kept = sorted(
        (u for u, idx in groups.items() if len(idx) >= min_examples), key=lambda u: (-len(groups[u]), u)
    )
    if not kept:
        raise DataError(
            f"no user has min_examples={min_examples} examples (largest has "
            f"{max(len(v) for v in groups.values())}); lower min_examples."
        )
    if max_clients is not None:
        kept = kept[:max_clients]
    return [groups[u] for u in kept]


def partition_iid(n: int, num_clients: int, rng: np.random.Generator) -> Partitions:
    """A uniformly random split of ``range(n)`` into ``num_clients`` parts whose sizes differ by <= 1."""
    rng = _check_rng(rng)
    if num_clients < 1:
        raise ConfigError(f"num_clients={num_clients!r} must be >= 1.")
    if n < num_clients:
        raise DataError(
            f"n={n} examples cannot give each of num_clients={num_clients} clients one; lower num_clients."
        )
    perm = rng.permutation(n)
    return [sorted(part.tolist()) for part in np.array_split(perm, num_clients)]


def partition_dirichlet(
    labels: Sequence[int],
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    max_retries: int = 100,
) -> Partitions:
    """Label-skewed split (Hsu et al. 2019; FedNLP): per class, proportions ~ Dir(alpha * 1).

    Each class's shuffled indices are cut at ``floor(cumsum(p) * n_class)`` and the pieces dealt to
    clients in a random order (so rounding losses do not pile up on one client). The whole draw is
    repeated until every client has at least ``min_size`` examples; after ``max_retries`` failed
    draws a :class:`DataError` is raised.
    """
    rng = _check_rng(rng)
    if num_clients < 1:
        raise ConfigError(f"num_clients={num_clients!r} must be >= 1.")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha={alpha!r} must be a finite number > 0 (e.g. 0.1 skewed, 100 near-iid).")
    if min_size < 0:
        raise ConfigError(f"min_size={min_size!r} must be >= 0.")
    if max_retries < 1:
        raise ConfigError(f"max_retries={max_retries!r} must be >= 1.")
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0)):
        raise DataError(
            f"labels must be a 1-D sequence of non-negative ints, got dtype {y.dtype} shape {y.shape}."
        )
    if y.size < num_clients * min_size:
        raise DataError(
            f"{y.size} examples cannot give num_clients={num_clients} clients min_size={min_size} each; "
            "lower num_clients or min_size."
        )
    class_indices = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(max_retries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for idx in class_indices:
            shuffled = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = np.floor(np.cumsum(p)[:-1] * len(shuffled)).astype(np.int64)
            # chunks go to clients in a random order so the floor() remainders do not always
            # fall on the same clients (Dir(alpha * 1) is exchangeable: proportions unchanged)
            order = rng.permutation(num_clients)
            for k, chunk in zip(order.tolist(), np.split(shuffled, cuts), strict=True):
                parts[k].extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_size:
            return [sorted(part) for part in parts]
    raise DataError(
        f"no Dirichlet draw with alpha={alpha} gave all num_clients={num_clients} clients "
        f"min_size={min_size} examples in max_retries={max_retries} tries; raise alpha or max_retries, "
        "or lower num_clients or min_size."
    )


def split_examples(
    indices: Sequence[int], test_fraction: float, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Random (train, test) split of ``indices``; ``round(test_fraction * n)`` go to test, but at
    least one stays in train when ``n >= 1``. Both parts keep the input order."""
    rng = _check_rng(rng)
    if not (0.0 <= test_fraction < 1.0):
        raise ConfigError(f"test_fraction={test_fraction!r} must be in [0, 1).")
    n = len(indices)
    n_test = min(max(n - 1, 0), int(round(test_fraction * n)))
    test_pos = set(rng.permutation(n)[:n_test].tolist())
    train = [int(indices[i]) for i in range(n) if i not in test_pos]
    test = [int(indices[i]) for i in range(n) if i in test_pos]
    return train, test


def train_test_split_by_client(
    partitions: Sequence[Sequence[int]], test_fraction: float, rng: np.random.Generator
) -> tuple[Partitions, Partitions]:
    """Per-client local (train, test) splits: ``split_examples`` applied to each client in order."""
    trains: Partitions = []
    tests: Partitions = []
    for part in partitions:
        tr, te = split_examples(part, test_fraction, rng)
        trains.append(tr)
        tests.append(te)
    return trains, tests


def holdout_clients(
    partitions: Sequence[Sequence[int]], fraction: float, rng: np.random.Generator
) -> tuple[Partitions, Partitions]:
    """(training clients, held-out clients), e.g. for perplexity on unseen participants.

    ``round(fraction * K)`` clients are held out (at least 1 if ``fraction > 0``, at most ``K - 1``);
    both lists keep the input client order.
    """
    rng = _check_rng(rng)
    if not (0.0 <= fraction < 1.0):
        raise ConfigError(f"fraction={fraction!r} must be in [0, 1).")
    k = len(partitions)
    n_out = int(round(fraction * k))
    if fraction > 0:
        n_out = max(n_out, 1)
    if n_out > k - 1:
        raise DataError(
            f"holding out fraction={fraction} of {k} clients leaves none to train; "
            "lower fraction or use more clients."
        )
    out = set(rng.permutation(k)[:n_out].tolist())
    train = [list(p) for i, p in enumerate(partitions) if i not in out]
    held = [list(p) for i, p in enumerate(partitions) if i in out]
    return train, held


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class PartitionConfig:
    """Which partitioner and its parameters.

    ``num_clients`` is required for "iid" and "dirichlet"; for "natural" it caps the number of
    users (None = all). ``alpha`` is used by "dirichlet", ``min_examples`` by "natural" (users
    with fewer examples are dropped) and "dirichlet" (minimum client size).
    """

    kind: str = "iid"
    num_clients: int | None = None
    alpha: float = 0.5
    seed: int = 0
    min_examples: int = 1

    def __post_init__(self) -> None:
        get_partitioner(self.kind)
        if self.num_clients is None:
            if self.kind != "natural":
                raise ConfigError(
                    "num_clients=None is only allowed for kind='natural'; "
                    f"set it for kind={self.kind!r}."
                )
        elif (
            isinstance(self.num_clients, bool)
            or not isinstance(self.num_clients, int)
            or self.num_clients < 1
        ):
            raise ConfigError(f"num_clients={self.num_clients!r} must be an int >= 1.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
            math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ConfigError(f"alpha={self.alpha!r} must be a finite number > 0.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} must be an int >= 0.")
        if (
            isinstance(self.min_examples, bool)
            or not isinstance(self.min_examples, int)
            or self.min_examples < 1
        ):
            raise ConfigError(f"min_examples={self.min_examples!r} must be an int >= 1.")


Partitioner = Callable[[Corpus, PartitionConfig, np.random.Generator], Partitions]


def _natural(corpus: Corpus, config: PartitionConfig, rng: np.random.Generator) -> Partitions:
    return partition_natural(corpus.users, min_examples=config.min_examples, max_clients=config.num_clients)


def _iid(corpus: Corpus, config: PartitionConfig, rng: np.random.Generator) -> Partitions:
    return partition_iid(len(corpus), _num_clients(config), rng)


def _dirichlet(corpus: Corpus, config: PartitionConfig, rng: np.random.Generator) -> Partitions:
    if corpus.task != "classification":
        raise DataError(
            f"dirichlet partition needs labels, but corpus {corpus.name!r} has task={corpus.task!r}; "
            "use 'natural' or 'iid'."
        )
    return partition_dirichlet(
        corpus.labels, _num_clients(config), config.alpha, rng, min_size=config.min_examples
    )


def _num_clients(config: PartitionConfig) -> int:
    if config.num_clients is None:  # excluded by PartitionConfig validation
        raise ConfigError(f"num_clients=None is not allowed for kind={config.kind!r}.")
    return config.num_clients


PARTITIONERS: dict[str, Partitioner] = {"natural": _natural, "iid": _iid, "dirichlet": _dirichlet}


def get_partitioner(name: str) -> Partitioner:
    """The registered partitioner ``name``; :class:`UnknownNameError` lists the known ones."""
    try:
        return PARTITIONERS[name]
    except (KeyError, TypeError):
        raise UnknownNameError(
            f"partitioner kind={name!r} is unknown; known: {sorted(PARTITIONERS)}."
        ) from None


def partition(corpus: Corpus, config: PartitionConfig) -> Partitions:
    """Partition ``corpus`` with ``config`` (randomness from ``numpy.random.default_rng(config.seed)``)."""
    return get_partitioner(config.kind)(corpus, config, np.random.default_rng(config.seed))
