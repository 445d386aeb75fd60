"""Mechanism events: what a client released, in a form an accountant can compose.

Modelled on Google ``dp_accounting``'s ``dp_event.py``: an event describes a mechanism, not
its privacy cost. One DP-SGD round of a client with Poisson sampling (rate ``q``), noise
multiplier ``sigma`` and ``steps`` optimiser steps is one
:class:`PoissonSampledGaussianEvent` (Abadi et al. 2016, "Deep Learning with Differential
Privacy"). Ledger metadata (round, dataset size, delta, clip norm, ...) lives in
:class:`EventMetadata` so that accounting depends only on the mechanism.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from fedpeft.core.checks import is_real
from fedpeft.privacy.accounting.errors import EventValidationError

#: Neighbouring relation a DP guarantee is stated for. ``"add_remove"``: datasets differing
#: by adding or removing one record (the dataset size itself is private). ``"replace_one"``:
#: datasets of the same size differing in one record (what holds when the size n is released).
Adjacency = Literal["add_remove", "replace_one"]
ADJACENCIES: tuple[Adjacency, ...] = ("add_remove", "replace_one")

#: How a client's Poisson batch sampling randomness was drawn. ``"csprng"``: from an
#: OS-keyed CSPRNG (unpredictable to the coordinator). ``"seeded"``: reproducible from a seed
#: the coordinator knows, so the coordinator can tell which records were in each batch and
#: subsampling amplification does not hold against it.
Sampling = Literal["csprng", "seeded"]
SAMPLINGS: tuple[Sampling, ...] = ("csprng", "seeded")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def validate_sample_rate(sample_rate: float, *, name: str = "sample_rate") -> float:
    """Return ``sample_rate`` as float if it lies in the open interval (0, 1)."""
    if not is_real(sample_rate) or not math.isfinite(sample_rate):
        raise EventValidationError(f"{name}={sample_rate!r} must be a finite number in (0, 1).")
    q = float(sample_rate)
    if q >= 1.0:
        raise EventValidationError(
            f"{name}={q!r} must be < 1: the local dataset is too small for the batch size "
            "(expected batch size >= dataset size gives no subsampling amplification). "
            "Use a smaller batch size or a larger local dataset."
        )
    if q <= 0.0:
        raise EventValidationError(
            f"{name}={q!r} must be > 0 (sample rate = expected batch size / dataset size)."
        )
    return q


def validate_noise_multiplier(noise_multiplier: float, *, name: str = "noise_multiplier") -> float:
    """Return ``noise_multiplier`` as float if it is finite and >= 0 (0 means no privacy)."""
    if not is_real(noise_multiplier) or not math.isfinite(noise_multiplier):
        raise EventValidationError(f"{name}={noise_multiplier!r} must be a finite number >= 0.")
    if noise_multiplier < 0:
        raise EventValidationError(
            f"{name}={noise_multiplier!r} must be >= 0 (0 means no noise, epsilon = inf)."
        )
    return float(noise_multiplier)


def validate_steps(steps: int, *, name: str = "steps") -> int:
    """Return ``steps`` if it is an integer >= 1."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EventValidationError(f"{name}={steps!r} must be an integer >= 1.")
    return steps


def validate_delta(delta: float, *, name: str = "delta") -> float:
    """Return ``delta`` as float if it lies in (0, 1)."""
    if not is_real(delta) or not math.isfinite(delta) or not 0.0 < delta < 1.0:
        raise EventValidationError(
            f"{name}={delta!r} must be in (0, 1); choose delta well below 1/dataset size "
            "(e.g. 1e-5)."
        )
    return float(delta)


def validate_epsilon(epsilon: float, *, name: str = "epsilon") -> float:
    """Return ``epsilon`` as float if it is finite and > 0."""
    if not is_real(epsilon) or not math.isfinite(epsilon) or epsilon <= 0:
        raise EventValidationError(f"{name}={epsilon!r} must be a finite number > 0.")
    return float(epsilon)


def validate_identifier(value: str, *, name: str) -> str:
    """Return ``value`` if it is a short identifier (letters, digits, ``._:@-``)."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise EventValidationError(
            f"{name}={value!r} must be 1-128 characters of letters, digits or ._:@- "
            "starting with a letter or digit."
        )
    return value


def validate_adjacency(adjacency: str, *, name: str = "adjacency") -> Adjacency:
    """Return ``adjacency`` if it is ``"add_remove"`` or ``"replace_one"``."""
    if adjacency == "add_remove":
        return "add_remove"
    if adjacency == "replace_one":
        return "replace_one"
    raise EventValidationError(
        f"{name}={adjacency!r} must be one of {list(ADJACENCIES)} ('replace_one' when the "
        "client releases its dataset size, 'add_remove' when the size stays private)."
    )


def validate_sampling(sampling: str, *, name: str = "sampling") -> Sampling:
    """Return ``sampling`` if it is ``"csprng"`` or ``"seeded"``."""
    if sampling == "csprng":
        return "csprng"
    if sampling == "seeded":
        return "seeded"
    raise EventValidationError(
        f"{name}={sampling!r} must be one of {list(SAMPLINGS)} ('csprng' when batches come "
        "from an OS-keyed CSPRNG, 'seeded' when they are reproducible from a seed)."
    )


def sample_rate_from(expected_batch_size: int, dataset_size: int) -> float:
    """Poisson sample rate ``q = expected_batch_size / dataset_size``, validated to (0, 1)."""
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
        raise EventValidationError(f"dataset_size={dataset_size!r} must be an integer >= 1.")
    if (isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, int)
            or expected_batch_size < 1):
        raise EventValidationError(
            f"expected_batch_size={expected_batch_size!r} must be an integer >= 1."
        )
    if expected_batch_size >= dataset_size:
        raise EventValidationError(
            f"expected_batch_size={expected_batch_size} >= dataset_size={dataset_size}: the "
            "local dataset is too small for the batch size (sample rate would be >= 1). Use a "
            "smaller batch size or more local data."
        )
    return validate_sample_rate(expected_batch_size / dataset_size)


@dataclass(frozen=True)
class PoissonSampledGaussianEvent:
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism (DP-SGD).

    Attributes:
        sample_rate: Poisson sampling probability q in (0, 1).
        noise_multiplier: sigma = noise std / clip norm, >= 0 (0: no privacy).
        steps: number of optimiser steps, >= 1.
    """

    sample_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_rate", validate_sample_rate(self.sample_rate))
        object.__setattr__(
            self, "noise_multiplier", validate_noise_multiplier(self.noise_multiplier)
        )
        validate_steps(self.steps)


def new_event_id() -> str:
    """A fresh random event id (uuid4 hex)."""
    return uuid.uuid4().hex


def utc_now() -> str:
    """Current UTC time as an ISO-8601 string."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class EventMetadata:
    """What the ledger records about an event besides the mechanism itself.

    ``delta`` is the delta the client accounts at; ``clip_norm`` is the per-sample L2 clip C
    (it does not enter epsilon, only the noise scale sigma * C). ``adjacency`` is the
    neighbouring relation the event's guarantee holds for (:data:`Adjacency`; default
    ``"replace_one"``, the conservative choice when the dataset size is released) and
    ``sampling`` how its Poisson batches were drawn (:data:`Sampling`; ``"seeded"`` means
    the round is not private against whoever knows the seed).
    """

    round_number: int
    dataset_size: int
    delta: float
    clip_norm: float
    run_id: str
    event_id: str = field(default_factory=new_event_id)
    timestamp: str = field(default_factory=utc_now)
    adjacency: str = "replace_one"
    sampling: str = "csprng"

    def __post_init__(self) -> None:
        if (isinstance(self.round_number, bool) or not isinstance(self.round_number, int)
                or self.round_number < 0):
            raise EventValidationError(
                f"round_number={self.round_number!r} must be an integer >= 0."
            )
        if (isinstance(self.dataset_size, bool) or not isinstance(self.dataset_size, int)
                or self.dataset_size < 1):
            raise EventValidationError(
                f"dataset_size={self.dataset_size!r} must be an integer >= 1."
            )
        object.__setattr__(self, "delta", validate_delta(self.delta))
        if (not is_real(self.clip_norm) or not math.isfinite(self.clip_norm)
                or self.clip_norm <= 0):
            raise EventValidationError(f"clip_norm={self.clip_norm!r} must be a finite number > 0.")
        object.__setattr__(self, "clip_norm", float(self.clip_norm))
        validate_identifier(self.run_id, name="run_id")
        validate_identifier(self.event_id, name="event_id")
        if not isinstance(self.timestamp, str) or not self.timestamp:
            raise EventValidationError(f"timestamp={self.timestamp!r} must be a non-empty string.")
        validate_adjacency(self.adjacency)
        validate_sampling(self.sampling)
