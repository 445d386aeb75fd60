"""White-box gradient canaries for DP-SGD (Nasr et al., USENIX Security 2023, "Dirac
canaries"; audited in one run as in Steinke, Nasr, Jagielski, NeurIPS 2023, sec. 7).

A gradient canary is a made-up record whose clipped gradient is ``C`` times a unit vector on
one coordinate of one trainable tensor. Canary ``i`` has an owner client, a coordinate and a
secret bit (in with probability 1/2). In each DP-SGD step of its owner, an included canary
joins the Poisson batch with the step's sample rate ``q`` (its own draw) and its gradient is
added to the summed clipped gradient **before** the noise; an excluded canary never is. The
auditor then sees each step's privatised (noisy) summed gradient, as the white-box threat
model allows (post-processing of the mechanism's output), and scores a canary by the sum over
its owner's steps of that gradient at its coordinate.

Against a correct implementation the one-run bound on these scores stays below the claimed
record-level epsilon (with the stated confidence). Noise that is reported but not added, or a
tensor that skips the noise (e.g. a head trained outside DP), separates the included
canaries' scores from the excluded ones and the bound goes past the claim. Canaries are
spread evenly over the kinds of trainable tensor (:func:`tensor_group`), and each kind is
also audited alone (:func:`audit_gradient_canaries`), so a bug in one kind shows.

:class:`GradientCanarySet` is the plan (pure, reproducible from the run seed);
:class:`CanaryHook` is one client's instrument for one call of DP-SGD. The scores are computed
on private data: they stay on the device (the simulation's auditor reads them there) and are
never sent to the coordinator.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from fedpeft.core.errors import ConfigError
from fedpeft.privacy.auditing.one_run import DEFAULT_CONFIDENCE, audit_scores

#: Seed domain of the gradient canaries (never the stream of the data canaries or the split).
GRADIENT_CANARY_DOMAIN = 0x6772_6164
#: Where a client keeps its canaries' scores, in its own state folder (one JSON row a round).
CANARY_SCORES_FILE = "gradient-canary-scores.jsonl"


@dataclass(frozen=True)
class GradientCanarySet:
    """``m`` gradient canaries over the trainable tensors ``names`` (in a fixed order)."""

    names: tuple[str, ...]
    tensor: tuple[int, ...]  # index into names
    coord: tuple[int, ...]  # flat index inside that tensor
    included: tuple[bool, ...]
    owners: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.coord)

    def owned_by(self, partition_id: int) -> tuple[int, ...]:
        """Indices of the canaries ``partition_id`` owns."""
        return tuple(i for i, o in enumerate(self.owners) if o == partition_id)


def tensor_group(name: str) -> str:
    """The kind of a trainable tensor: its name with layer indices replaced by ``N``
    (``...layer.3.attention.self.query.lora_A...`` -> ``...layer.N.attention...``)."""
    return re.sub(r"\.\d+(?=\.)", ".N", name)


def spread(m: int, sizes: Sequence[int]) -> list[int]:
    """``m`` canaries over tensors of ``sizes`` coordinates: as even as the sizes allow (a
    tensor smaller than its share is filled and the rest is spread over the others)."""
    share = [0] * len(sizes)
    left, open_ = m, [t for t, n in enumerate(sizes) if n > 0]
    while left and open_:
        each, extra = divmod(left, len(open_))
        still: list[int] = []
        for rank, t in enumerate(open_):
            take = min(sizes[t] - share[t], each + (1 if rank < extra else 0))
            share[t] += take
            left -= take
            if share[t] < sizes[t]:
                still.append(t)
        open_ = still
    return share


@functools.lru_cache(maxsize=8)
def plan_gradient_canaries(m: int, tensors: tuple[tuple[str, int], ...], *,
                           num_partitions: int, seed: int) -> GradientCanarySet:
    """``m`` canaries over ``tensors`` (``(name, numel)`` pairs, sorted by name here so every
    party builds the same plan): spread evenly over the kinds of tensor
    (:func:`tensor_group`: the classification head gets as many as all the layers' LoRA A
    matrices together), then over the tensors of a kind; distinct coordinates, owners
    uniform."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(f"audit-gradient-canaries={m!r} must be an integer >= 1 (0: none)")
    if num_partitions < 1:
        raise ConfigError(f"num_partitions={num_partitions} must be >= 1")
    ordered = tuple(sorted(tensors))
    if not ordered:
        raise ConfigError("gradient canaries need trainable tensors; the adapter has none")
    total = sum(numel for _, numel in ordered)
    if m > total:
        raise ConfigError(f"audit-gradient-canaries={m} exceeds the {total} trainable "
                          "coordinates of the adapter; use fewer canaries")
    rng = np.random.default_rng([GRADIENT_CANARY_DOMAIN, seed])
    groups = sorted({tensor_group(name) for name, _ in ordered})
    members = [[t for t, (name, _) in enumerate(ordered) if tensor_group(name) == g]
               for g in groups]
    share = [0] * len(ordered)
    per_group = spread(m, [sum(ordered[t][1] for t in ts) for ts in members])
    for ts, k in zip(members, per_group, strict=True):
        for t, kt in zip(ts, spread(k, [ordered[t][1] for t in ts]), strict=True):
            share[t] = kt
    tensor: list[int] = []
    coord: list[int] = []
    for t, ((_, numel), k) in enumerate(zip(ordered, share, strict=True)):
        tensor.extend([t] * k)
        coord.extend(int(c) for c in rng.choice(numel, size=k, replace=False))
    included = tuple(bool(b) for b in rng.random(m) < 0.5)
    owners = tuple(int(o) for o in rng.integers(num_partitions, size=m))
    return GradientCanarySet(tuple(n for n, _ in ordered), tuple(tensor), tuple(coord),
                             included, owners)


@dataclass
class CanaryHook:
    """One client's canaries for one DP-SGD call: injected before the noise, observed after.

    ``params`` maps each trainable tensor's name to the parameter object the optimiser
    steps; ``sample_rate`` is the step's Poisson rate ``q``; ``rng`` decides which included
    canaries join each step (an audit instrument, not part of the mechanism: it only has to
    be independent of the scores' noise).
    """

    canaries: GradientCanarySet
    owned: tuple[int, ...]
    params: Mapping[str, torch.Tensor]
    sample_rate: float
    rng: np.random.Generator
    steps: int = 0
    #: per parameter (by identity): the owned canaries on it and their flat coordinates
    _by_param: dict[int, tuple[npt.NDArray[np.int64], torch.Tensor]] = field(
        default_factory=dict, repr=False)
    _totals: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0), repr=False)
    _joined: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool), repr=False)
    _included: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool),
                                             repr=False)

    def __post_init__(self) -> None:
        missing = [n for n in self.canaries.names if n not in self.params]
        if missing:
            raise ConfigError(f"gradient canaries name tensors this model does not train: "
                              f"{missing[:3]}; plan them from the same adapter")
        owned = np.asarray(self.owned, dtype=np.int64)
        tensors = np.asarray(self.canaries.tensor, dtype=np.int64)[owned] if owned.size else owned
        for t, name in enumerate(self.canaries.names):
            rows = np.flatnonzero(tensors == t)  # positions in self.owned
            if rows.size:
                coords = torch.tensor([self.canaries.coord[self.owned[r]] for r in rows],
                                      dtype=torch.long)
                self._by_param[id(self.params[name])] = (rows, coords)
        self._totals = np.zeros(len(self.owned))
        self._included = np.array([self.canaries.included[i] for i in self.owned], dtype=bool)

    @property
    def scores(self) -> dict[int, float]:
        """Each owned canary's score so far (its index in the plan -> score)."""
        return {i: float(v) for i, v in zip(self.owned, self._totals, strict=True)}

    def inject(self, params: Iterable[torch.Tensor], summed: Sequence[torch.Tensor],
               clip: float) -> None:
        """Before the noise: add ``clip`` at the coordinate of each included canary that joins
        this step (``summed[j]`` is the summed clipped gradient of ``params[j]``)."""
        self.steps += 1
        self._joined = (self.rng.random(len(self.owned)) < self.sample_rate) & self._included
        with torch.no_grad():
            for p, g in zip(params, summed, strict=True):
                entry = self._by_param.get(id(p))
                if entry is None:
                    continue
                rows, coords = entry
                pick = torch.from_numpy(self._joined[rows])
                if bool(pick.any()):
                    flat = g.view(-1)  # audit: the canaries' clipped gradients join the sum
                    flat.index_add_(0, coords[pick], torch.full(
                        (int(pick.sum()),), clip, dtype=flat.dtype, device=flat.device))

    def observe(self, params: Iterable[torch.Tensor], noisy: Sequence[torch.Tensor]) -> None:
        """After the noise: add each canary's coordinate of the privatised sum to its score."""
        seen = np.zeros(len(self.owned), dtype=bool)
        for p, g in zip(params, noisy, strict=True):
            entry = self._by_param.get(id(p))
            if entry is None:
                continue
            rows, coords = entry
            self._totals[rows] += g.detach().reshape(-1)[coords].double().cpu().numpy()
            seen[rows] = True
        if not seen.all():
            names = sorted({self.canaries.names[self.canaries.tensor[self.owned[r]]]
                            for r in np.flatnonzero(~seen)})
            # a trainable tensor that DP-SGD's noise step never saw is trained outside DP
            raise ConfigError(f"trainable tensors {names[:3]} did not pass through DP-SGD's "
                              "noise step: they are trained outside DP")


def tensor_sizes(named: Mapping[str, torch.Tensor]) -> tuple[tuple[str, int], ...]:
    """``(name, numel)`` of the trainable tensors, for :func:`plan_gradient_canaries`."""
    return tuple(sorted((n, int(p.numel())) for n, p in named.items()))


def audit_gradient_canaries(plan: GradientCanarySet, scores: Sequence[float], *, delta: float,
                            confidence: float = DEFAULT_CONFIDENCE) -> dict[str, object]:
    """The one-run bound from every canary, and from the canaries of each kind of tensor
    alone (a bug often hits one kind: a head outside the noise), each at confidence
    ``1 - (1 - confidence) / tests`` (a union bound over the ``tests`` bounds, so the largest
    holds at ``confidence``). Returns the largest, where it came from and every bound."""
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != (len(plan),):
        raise ConfigError(f"{values.size} scores for {len(plan)} gradient canaries")
    included = np.array(plan.included, dtype=bool)
    kinds = np.array([tensor_group(plan.names[t]) for t in plan.tensor])
    subsets: dict[str, npt.NDArray[np.bool_]] = {"all": np.ones(len(plan), dtype=bool)}
    names = sorted(set(kinds.tolist()))
    for g in names if len(names) > 1 else ():
        sel = kinds == g
        if included[sel].any() and (~included[sel]).any():
            subsets[g] = sel
    corrected = 1.0 - (1.0 - confidence) / len(subsets)
    results = {name: audit_scores(values[sel & included], values[sel & ~included],
                                  delta=delta, confidence=corrected)
               for name, sel in subsets.items()}
    where = max(results, key=lambda k: results[k].epsilon_lower_bound)
    best = results[where]
    return {**best.as_dict(), "confidence": confidence, "canaries": len(plan),
            "tests": len(results), "per_test_confidence": corrected, "bound_from": where,
            "bounds": {k: {"epsilon_lower_bound": r.epsilon_lower_bound,
                           "canaries": r.canaries, "ceiling": r.ceiling}
                       for k, r in results.items()}}
