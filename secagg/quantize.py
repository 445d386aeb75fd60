"""Clipping, stochastic rounding and modulus planning (pure functions).

Encoding (see docs/secagg.md): each coordinate is clipped to ``[-clip, clip]`` (per-coordinate,
i.e. L-infinity clipping; an L2 clip C implies this with clip = C), scaled by ``scale``,
stochastically rounded to an integer ``q`` with ``|q| <= max_level`` and stored in two's
complement mod 2^b. The plan guarantees ``n * max_level <= 2^(b-1) - 1``, so the modular sum
of up to ``n`` clients decodes to the exact signed integer sum (it can never wrap).
Stochastic rounding is unbiased (Gupta et al., ICML 2015); its uniforms come from a ChaCha20
keystream keyed by an explicitly passed seed (utility only: it does not affect security).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedpeft.secagg.errors import ModulusOverflowError, SecAggConfigError, UpdateError
from fedpeft.secagg.prg import SEED_BYTES, uniform01

#: Narrowest modulus 2^bits a round may use.
MIN_BITS = 8
#: Widest modulus (masks are ``uint32`` words).
MAX_BITS = 32
#: Smallest per-coordinate clip. Below it the scale ``max_level / clip`` (up to 2^31 / clip)
#: leaves float64's useful range (clip=1e-300 gives an infinite scale) and the grid is finer
#: than any float32 update can resolve.
MIN_CLIP = 1e-12
#: Largest per-coordinate clip. Above it one grid step (``clip / max_level``, at least
#: 1e12 / 2^31 ~ 466) is coarser than any adapter update, which would round to zero.
MAX_CLIP = 1e12


@dataclass(frozen=True)
class QuantizationPlan:
    """Grid and modulus for one round: ``n_clients`` values in ``[-clip, clip]`` on ``b`` bits."""

    bits: int
    clip: float
    n_clients: int
    max_level: int  # largest |q| of one client's coordinate

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise SecAggConfigError(f"bits={self.bits} must be in [{MIN_BITS}, {MAX_BITS}]")
        if not (isinstance(self.clip, (int, float)) and MIN_CLIP <= self.clip <= MAX_CLIP):
            raise SecAggConfigError(
                f"clip={self.clip!r} must be a finite float in [MIN_CLIP, MAX_CLIP] = "
                f"[{MIN_CLIP:g}, {MAX_CLIP:g}]; set the clip to the per-coordinate bound of the update"
            )
        if self.n_clients < 1:
            raise SecAggConfigError(f"n_clients={self.n_clients} must be >= 1")
        if self.max_level < 1:
            raise ModulusOverflowError(
                f"max_level={self.max_level}: bits={self.bits} leave no grid level for "
                f"n_clients={self.n_clients}; raise bits or lower the number of clients"
            )
        # security: fail closed if the sum of n clients could wrap around the modulus.
        if self.n_clients * self.max_level > (1 << (self.bits - 1)) - 1:
            raise ModulusOverflowError(
                f"n_clients * max_level = {self.n_clients} * {self.max_level} exceeds "
                f"2^(bits-1) - 1 = {(1 << (self.bits - 1)) - 1} for bits={self.bits}; the sum could "
                "wrap: lower max_level, raise bits or lower n_clients"
            )

    @property
    def modulus(self) -> int:
        """The modulus 2^b."""
        return 1 << self.bits

    @property
    def scale(self) -> float:
        """Grid levels per unit: ``max_level / clip``."""
        return self.max_level / self.clip

    @property
    def step(self) -> float:
        """Grid step ``clip / max_level`` (the value of one integer level)."""
        return self.clip / self.max_level

    @property
    def worst_case_mean_error(self) -> float:
        """Bound on |error| of the mean of the clipped values per coordinate (< one step)."""
        return self.step

    def expected_mean_error(self, n_summed: int | None = None) -> float:
        """RMS error of the mean per coordinate: at most ``step / (2 sqrt(n))``."""
        n = self.n_clients if n_summed is None else n_summed
        return self.step / (2.0 * math.sqrt(max(n, 1)))


#: Bits of the modulus left unused by ``n`` clients at the clip: the decoded sum of honest
#: inputs lies in the lower half of the signed range, so a substituted or garbled masked
#: vector (uniform mod 2^b) passes the server's range check with probability <= 2^-L.
HEADROOM_BITS = 1


def plan_quantization(
    clip: float, n_clients: int, bits: int = 32, max_level: int | None = None
) -> QuantizationPlan:
    """Plan the grid so ``n_clients`` values can never wrap mod 2^bits.

    By default uses as many levels as the modulus allows after :data:`HEADROOM_BITS`:
    ``max_level = floor((2^(b-1)-1) / (n 2^h))``, i.e. ``scale = max_level / clip``. A given
    ``max_level`` is checked (fail closed).
    """
    if not MIN_BITS <= bits <= MAX_BITS:
        raise SecAggConfigError(f"bits={bits} must be in [{MIN_BITS}, {MAX_BITS}]")
    if n_clients < 1:
        raise SecAggConfigError(f"n_clients={n_clients} must be >= 1")
    level = (((1 << (bits - 1)) - 1) // (n_clients << HEADROOM_BITS) if max_level is None
             else max_level)
    return QuantizationPlan(bits=bits, clip=float(clip), n_clients=n_clients, max_level=level)


def check_update(x: npt.NDArray[np.floating[npt.NBitBase]], length: int) -> None:
    """Raise :class:`UpdateError` unless ``x`` is a finite float vector of ``length``."""
    if not isinstance(x, np.ndarray) or x.ndim != 1 or x.shape[0] != length:
        shape = getattr(x, "shape", None)
        raise UpdateError(f"update shape={shape} must be a 1-D array of length {length}")
    if not np.issubdtype(x.dtype, np.floating):
        raise UpdateError(f"update dtype={x.dtype} must be floating (np.float32 expected)")
    if not bool(np.all(np.isfinite(x))):
        raise UpdateError("update contains NaN or inf; fix the local training step")


def clip_per_coordinate(
    x: npt.NDArray[np.floating[npt.NBitBase]], clip: float
) -> npt.NDArray[np.float64]:
    """Clamp each coordinate to ``[-clip, clip]`` (float64 result)."""
    return np.clip(x.astype(np.float64), -clip, clip)


def stochastic_round(values: npt.NDArray[np.float64], seed: bytes) -> npt.NDArray[np.int64]:
    """Round to ``floor(v) + Bernoulli(frac(v))`` with uniforms from ChaCha20(``seed``).

    Unbiased up to 2^-32 of a level (uniforms lie on the 2^-32 grid).
    """
    if len(seed) != SEED_BYTES:
        raise SecAggConfigError(f"rounding seed length={len(seed)} must be {SEED_BYTES} bytes")
    floor = np.floor(values)
    up = uniform01(seed, values.shape[0]) < (values - floor)
    return floor.astype(np.int64) + up.astype(np.int64)


def quantize(
    x: npt.NDArray[np.floating[npt.NBitBase]], plan: QuantizationPlan, rounding_seed: bytes
) -> npt.NDArray[np.uint32]:
    """Clip, scale, stochastically round and encode ``x`` as two's complement mod 2^b (uint32)."""
    check_update(x, x.shape[0] if isinstance(x, np.ndarray) and x.ndim == 1 else -1)
    levels = stochastic_round(clip_per_coordinate(x, plan.clip) * plan.scale, rounding_seed)
    # security: float rounding at the edge could give max_level + 1; clamp keeps the no-wrap proof.
    levels = np.clip(levels, -plan.max_level, plan.max_level)
    return encode_signed(levels, plan.bits)


def encode_signed(levels: npt.NDArray[np.int64], bits: int) -> npt.NDArray[np.uint32]:
    """Two's complement of signed integers mod 2^bits, as uint32."""
    return (levels & ((1 << bits) - 1)).astype(np.uint32)


def decode_signed(words: npt.NDArray[np.uint16] | npt.NDArray[np.uint32], bits: int) -> npt.NDArray[np.int64]:
    """Inverse of :func:`encode_signed` on ``[-2^(b-1), 2^(b-1) - 1]``."""
    v = words.astype(np.int64) & ((1 << bits) - 1)
    return np.where(v >= 1 << (bits - 1), v - (1 << bits), v)


def dequantize(int_sum: npt.NDArray[np.int64], plan: QuantizationPlan) -> npt.NDArray[np.float64]:
    """Float value of a decoded integer (sum) vector: ``int_sum * step``."""
    return int_sum.astype(np.float64) / plan.scale
