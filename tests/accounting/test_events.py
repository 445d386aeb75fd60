"""Unit tests: event and metadata validation."""

from __future__ import annotations

import math

import pytest

from fedpeft.core.errors import ConfigError
from fedpeft.privacy.accounting.errors import EventValidationError
from fedpeft.privacy.accounting.events import (
    EventMetadata,
    PoissonSampledGaussianEvent,
    sample_rate_from,
    validate_delta,
    validate_epsilon,
)


def test_valid_event_is_frozen_and_normalised() -> None:
    e = PoissonSampledGaussianEvent(0.01, 1, 10)
    assert e.noise_multiplier == 1.0 and isinstance(e.noise_multiplier, float)
    with pytest.raises(AttributeError):
        e.steps = 3  # type: ignore[misc]


def test_sample_rate_one_says_dataset_too_small() -> None:
    with pytest.raises(EventValidationError, match=r"sample_rate=1\.0.*too small for the batch"):
        PoissonSampledGaussianEvent(1.0, 1.0, 1)
    with pytest.raises(EventValidationError, match="too small for the batch size"):
        sample_rate_from(64, 64)


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, math.nan, math.inf, True, "0.1"])
def test_bad_sample_rate(q: object) -> None:
    with pytest.raises(EventValidationError, match="sample_rate="):
        PoissonSampledGaussianEvent(q, 1.0, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("sigma", [-0.1, math.nan, math.inf])
def test_bad_noise_multiplier(sigma: float) -> None:
    with pytest.raises(EventValidationError, match="noise_multiplier="):
        PoissonSampledGaussianEvent(0.1, sigma, 1)


def test_zero_noise_allowed() -> None:
    assert PoissonSampledGaussianEvent(0.1, 0.0, 1).noise_multiplier == 0.0


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_bad_steps(steps: object) -> None:
    with pytest.raises(EventValidationError, match="steps="):
        PoissonSampledGaussianEvent(0.1, 1.0, steps)  # type: ignore[arg-type]


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan])
def test_bad_delta(delta: float) -> None:
    with pytest.raises(EventValidationError, match="delta="):
        validate_delta(delta)


@pytest.mark.parametrize("eps", [0.0, -1.0, math.inf])
def test_bad_epsilon(eps: float) -> None:
    with pytest.raises(EventValidationError, match="epsilon="):
        validate_epsilon(eps)


def test_errors_are_config_errors() -> None:
    assert issubclass(EventValidationError, ConfigError)


def test_sample_rate_from() -> None:
    assert sample_rate_from(32, 3200) == pytest.approx(0.01)


def test_metadata_validation() -> None:
    m = EventMetadata(round_number=1, dataset_size=100, delta=1e-5, clip_norm=1.0, run_id="r1")
    assert len(m.event_id) == 32 and m.timestamp
    with pytest.raises(EventValidationError, match="clip_norm="):
        EventMetadata(round_number=1, dataset_size=100, delta=1e-5, clip_norm=0.0, run_id="r")
    with pytest.raises(EventValidationError, match="run_id="):
        EventMetadata(round_number=1, dataset_size=100, delta=1e-5, clip_norm=1.0,
                      run_id="bad id\n")
    with pytest.raises(EventValidationError, match="round_number="):
        EventMetadata(round_number=-1, dataset_size=100, delta=1e-5, clip_norm=1.0, run_id="r")
