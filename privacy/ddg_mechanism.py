"""The distributed discrete Gaussian mechanism's encoding into the SecAgg field (issue 15, part).

Kairouz, Liu and Steinke, ICML 2021 (KLS), Algorithm 1, as pure functions:

client  clip the whole update to L2 norm ``c`` -> pad to whole 2,048-blocks and rotate with a
        randomised Hadamard transform (signs from a round-shared key) -> scale by ``1/gamma``
        -> conditional randomised rounding to integers (retry until the rounded norm is within
        the bound of KLS Prop. 22; parameter ``beta``) -> add exact N_Z(0, sigma^2) noise
        (``fedpeft.privacy.discrete_gaussian``) -> two's complement mod ``2^bits``
        (``fedpeft.secagg.quantize.encode_signed``: the SecAgg field).
server  the modular sum of the survivors -> signed integers -> times ``gamma`` -> inverse
        rotation -> the noisy sum of the clipped updates.

:func:`plan_granularity` picks ``gamma`` so that the sum wraps the field with probability at
most ``wrap_probability`` (union bound over coordinates; each rotated coordinate of an update
of norm ``c`` is sub-Gaussian with variance proxy ``c^2 / B`` in the worst case of the whole
norm in one Hadamard block of ``B``, KLS Lemma 29) and fails closed
when no ``gamma`` fits. The accounting of what a plan releases is
``fedpeft.privacy.accounting.ddg``; a run uses it through ``fedpeft.privacy.user_level``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from fedpeft.core.checks import is_real
from fedpeft.core.errors import ConfigError
from fedpeft.privacy.accounting.ddg import (
    DistributedDiscreteGaussianEvent,
    l2_sensitivity_squared,
)
from fedpeft.privacy.discrete_gaussian import ExactIntegers, discrete_gaussian_batch
from fedpeft.secagg.prg import SEED_BYTES, ChaCha20Stream
from fedpeft.secagg.quantize import MAX_BITS, MIN_BITS, decode_signed, encode_signed

#: Nonce domain of the rotation's sign stream (the key is shared by the round's clients).
NONCE_ROTATION = bytes(4) + b"fp-ddg-rot\x00\x00"
#: Largest per-client integer noise variance a plan uses: the batch sampler's int64 path
#: (``discrete_gaussian_batch``) covers it at about 3 us a coordinate; above it (a 32-bit field
#: planned at its finest grid gives ~7e15) each draw falls back to Python integers (~40 us).
MAX_GRID_VARIANCE = 1 << 28
#: Length of one block of the randomised Hadamard rotation: the update is padded to a whole
#: number of blocks (at most 2,047 zeros) rather than to a power of two (up to 2x the upload).
#: Each block is an orthogonal map, so the guarantee is unchanged; the field planner assumes
#: the worst case of an update's whole norm in one block.
HADAMARD_BLOCK = 2048
#: Conditional rounding retries before giving up (each retry fails with probability <= beta).
MAX_ROUNDING_TRIES = 1000

FloatArray = npt.NDArray[np.float64]
Uniforms = Callable[[int], FloatArray]


class DDGMechanismError(ConfigError):
    """A distributed discrete Gaussian plan or input is invalid (the message names the knob)."""


def block_size(d: int) -> int:
    """The Hadamard block length for a vector of ``d``: :data:`HADAMARD_BLOCK`, or the smallest
    power of two >= ``d`` when that is shorter."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise DDGMechanismError(f"dimension={d!r} must be an integer >= 1")
    return min(HADAMARD_BLOCK, 1 << (d - 1).bit_length())


def padded_dimension(d: int) -> int:
    """The rotated vector's length: ``d`` rounded up to a whole number of blocks."""
    b = block_size(d)
    return -(-d // b) * b


@dataclass(frozen=True)
class DDGPlan:
    """One round's encoding: clip, grid, per-client integer noise variance, field, dimension.

    ``local_variance`` is on the integer grid (``sigma^2``); the noise in update units has
    standard deviation ``granularity * sqrt(local_variance)`` per client.
    """

    clip: float
    granularity: float
    local_variance: Fraction
    bits: int
    dimension: int
    beta: float = math.exp(-0.5)

    def __post_init__(self) -> None:
        for name in ("clip", "granularity"):
            v = getattr(self, name)
            if not is_real(v) or not math.isfinite(v) or v <= 0:
                raise DDGMechanismError(f"{name}={v!r} must be a finite number > 0")
        if not isinstance(self.local_variance, Fraction) or self.local_variance < 1:
            raise DDGMechanismError(f"local_variance={self.local_variance!r} must be a Fraction "
                                    ">= 1 on the integer grid (choose a finer granularity)")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not (
                MIN_BITS <= self.bits <= MAX_BITS):
            raise DDGMechanismError(f"bits={self.bits!r} must be an integer in "
                                    f"[{MIN_BITS}, {MAX_BITS}]")
        padded_dimension(self.dimension)
        if not is_real(self.beta) or not 0.0 < self.beta < 1.0:
            raise DDGMechanismError(f"beta={self.beta!r} must be in (0, 1)")

    @property
    def padded(self) -> int:
        """Length of the rotated vector (a whole number of Hadamard blocks)."""
        return padded_dimension(self.dimension)

    def rounding_bound_squared(self) -> float:
        """Largest squared L2 norm a conditionally rounded update may have (integer grid; KLS
        Thm. 1 / Prop. 22 with ``d`` = the padded length)."""
        # the accountant's sensitivity bound on this grid (one formula for both): the smaller of
        # the plain rounding bound, which any randomised rounding meets, and Prop. 22's
        return l2_sensitivity_squared(self.clip, self.granularity, self.padded,
                                      self.beta) / self.granularity ** 2

    def accounting_event(self, sample_rate: float, contributors: int,
                         steps: int = 1) -> DistributedDiscreteGaussianEvent:
        """What one release under this plan spends, for the user-level accountant.

        ``contributors``: the noise shares actually in the sum that protect the accounted user
        (see :mod:`fedpeft.privacy.accounting.ddg`). The variance is rounded down to a float
        (never more noise accounted than present); the grid and the padded length are the
        ones the sensitivity bound needs.
        """
        variance = float(self.local_variance)
        if Fraction(variance) > self.local_variance:  # security: round toward more epsilon
            variance = math.nextafter(variance, 0.0)
        return DistributedDiscreteGaussianEvent(
            sample_rate=sample_rate, clip=self.clip, granularity=self.granularity,
            local_variance=variance, contributors=contributors, dimension=self.padded,
            beta=self.beta, steps=steps)


# -- the rotation (public randomness) --------------------------------------------------------
def rotation_signs(key: bytes, length: int) -> FloatArray:
    """``length`` random signs (+1/-1) from the round-shared ``key`` (ChaCha20, own domain)."""
    if not isinstance(key, bytes) or len(key) != SEED_BYTES:
        raise DDGMechanismError(f"rotation key must be {SEED_BYTES} bytes")
    bits = np.unpackbits(np.frombuffer(ChaCha20Stream(key, NONCE_ROTATION).read(
        (length + 7) // 8), dtype=np.uint8), bitorder="little")[:length]
    return 1.0 - 2.0 * bits.astype(np.float64)


def hadamard(x: FloatArray, block: int | None = None) -> FloatArray:
    """The orthonormal Walsh-Hadamard transform of each ``block`` of ``x`` (a power of two
    dividing the length; default the whole length); it is its own inverse."""
    n = x.shape[0]
    b = n if block is None else block
    if b & (b - 1) or b == 0 or n % b:
        raise DDGMechanismError(f"Hadamard block {b} must be a power of two dividing {n}")
    y: FloatArray = np.array(x, dtype=np.float64, copy=True).reshape(-1, b)
    h = 1
    while h < b:
        y = y.reshape(y.shape[0], -1, 2, h)
        first, second = y[:, :, 0, :].copy(), y[:, :, 1, :].copy()
        y[:, :, 0, :], y[:, :, 1, :] = first + second, first - second
        y = y.reshape(-1, b)
        h *= 2
    return y.reshape(n) / math.sqrt(b)


def rotate(x: FloatArray, signs: FloatArray) -> FloatArray:
    """Pad ``x`` with zeros to ``len(signs)`` and apply ``H D`` (D = diag(signs), H the
    block-diagonal Hadamard transform of :func:`block_size`): an orthogonal map."""
    if x.shape[0] > signs.shape[0]:
        raise DDGMechanismError(f"vector of {x.shape[0]} exceeds the rotation's {signs.shape[0]}")
    padded = np.zeros(signs.shape[0])
    padded[: x.shape[0]] = x
    return hadamard(padded * signs, block_size(signs.shape[0]))


def unrotate(y: FloatArray, signs: FloatArray, dimension: int) -> FloatArray:
    """The inverse of :func:`rotate`, cut back to ``dimension`` coordinates."""
    return (hadamard(y, block_size(y.shape[0])) * signs)[:dimension]


# -- the client's encoding -------------------------------------------------------------------
def clip_l2(x: FloatArray, clip: float) -> FloatArray:
    """``x`` scaled down to L2 norm ``clip`` when longer (the user's whole update)."""
    norm = float(np.linalg.norm(x))
    if not math.isfinite(norm):
        raise DDGMechanismError("update has a non-finite coordinate")
    return x if norm <= clip else x * (clip / norm)


def conditional_round(x: FloatArray, bound_squared: float, uniforms: Uniforms,
                      max_tries: int = MAX_ROUNDING_TRIES) -> npt.NDArray[np.int64]:
    """Randomised rounding of every coordinate (``floor(x) + [U < frac(x)]``), repeated until
    the result's squared L2 norm is at most ``bound_squared`` (KLS Prop. 22)."""
    low = np.floor(x)
    frac = x - low
    for _ in range(max_tries):
        rounded = low + (uniforms(x.shape[0]) < frac)
        if float(np.dot(rounded, rounded)) <= bound_squared:
            return rounded.astype(np.int64)
    raise DDGMechanismError(f"conditional rounding exceeded its norm bound {max_tries} times; "
                            "the update is longer than the clip (a bug) or beta is too small")


def client_encode(update: FloatArray, plan: DDGPlan, rotation_key: bytes, *,
                  rounding: Uniforms, noise: ExactIntegers) -> npt.NDArray[np.uint32]:
    """One client's field vector: clip, rotate, scale, round, add N_Z(0, sigma^2), mod 2^bits."""
    x = np.asarray(update, dtype=np.float64).reshape(-1)
    if x.shape[0] != plan.dimension:
        raise DDGMechanismError(f"update has {x.shape[0]} coordinates; the plan has "
                                f"{plan.dimension}")
    signs = rotation_signs(rotation_key, plan.padded)
    scaled = rotate(clip_l2(x, plan.clip), signs) / plan.granularity
    levels = conditional_round(scaled, plan.rounding_bound_squared(), rounding)
    # security: the privacy noise, exact integers from the client's own CSPRNG stream
    noisy = levels + discrete_gaussian_batch(plan.padded, plan.local_variance, noise)
    return encode_signed(noisy, plan.bits)


#: Probability that an honest sum fails :func:`server_decode`'s norm check (a false alarm).
SUM_CHECK_FALSE_ALARM = 1e-9


def sum_norm_bound(plan: DDGPlan, survivors: int,
                   false_alarm: float = SUM_CHECK_FALSE_ALARM) -> float:
    """L2 norm (integer grid) the sum of ``survivors`` honest field vectors stays below except
    with probability ``false_alarm``.

    Signal: each conditionally rounded update has norm at most ``sqrt(rounding_bound_squared)``
    (deterministic), so their sum at most ``survivors`` times that. Noise: the sum of the
    survivors' ``N_Z(0, sigma^2)`` vectors has independent ``survivors * sigma^2``-subgaussian
    coordinates (Canonne, Kamath, Steinke 2020, Prop. 18), so by Hsu, Kakade, Zhang (ECP 2012,
    Thm. 1) its squared norm exceeds ``v (d + 2 sqrt(d x) + 2 x)`` with probability at most
    ``e^-x``. The triangle inequality adds the two.
    """
    if isinstance(survivors, bool) or not isinstance(survivors, int) or survivors < 1:
        raise DDGMechanismError(f"survivors={survivors!r} must be an integer >= 1")
    if not is_real(false_alarm) or not 0.0 < false_alarm < 1.0:
        raise DDGMechanismError(f"false_alarm={false_alarm!r} must be in (0, 1)")
    x, d = math.log(1.0 / false_alarm), plan.padded
    noise_sq = survivors * float(plan.local_variance) * (d + 2.0 * math.sqrt(d * x) + 2.0 * x)
    return survivors * math.sqrt(plan.rounding_bound_squared()) + math.sqrt(noise_sq)


def server_decode(field_sum: npt.NDArray[np.uint32], plan: DDGPlan,
                  rotation_key: bytes, *, survivors: int | None = None) -> FloatArray:
    """The noisy sum of the survivors' clipped updates from their modular sum.

    With ``survivors``, a sum longer than :func:`sum_norm_bound` raises
    :class:`DDGMechanismError`: it cannot come from that many honest clients (a substituted
    or garbled masked vector, or a wrapped sum), so it is never released.
    """
    if field_sum.shape != (plan.padded,):
        raise DDGMechanismError(f"sum has shape {field_sum.shape}; expected ({plan.padded},)")
    levels = decode_signed(field_sum, plan.bits).astype(np.float64)
    if survivors is not None:
        norm, bound = float(np.linalg.norm(levels)), sum_norm_bound(plan, survivors)
        if not norm <= bound:  # security: a sum no honest survivors can produce is not used
            raise DDGMechanismError(
                f"the unmasked sum has norm {norm:.4g} on the grid, beyond the {bound:.4g} that "
                f"{survivors} clipped, noised updates reach (false alarm "
                f"{SUM_CHECK_FALSE_ALARM:g}): a masked input was substituted or corrupted; the "
                "round is discarded"
            )
    return unrotate(levels * plan.granularity, rotation_signs(rotation_key, plan.padded),
                    plan.dimension)


# -- planning the field -----------------------------------------------------------------------
def sum_bound(clip: float, granularity: float, noise_std: float, clients: int, padded: int,
              wrap_probability: float) -> float:
    """Bound (update units) that every coordinate of the sum of ``clients`` encoded updates
    stays below, except with probability ``wrap_probability`` over all coordinates.

    Per coordinate the sum is sub-Gaussian with variance proxy ``clients^2 c^2 / B`` (signal,
    clients' rotated updates aligned and each update's whole norm in one Hadamard block of
    ``B``: the worst case; KLS Lemma 29 per block) plus ``clients (gamma^2 / 4 + std^2)``
    (rounding and noise); ``k = sqrt(2 ln(2 d / p))`` of those, a union bound over ``d``.
    """
    k = math.sqrt(2.0 * math.log(2.0 * padded / wrap_probability))
    proxy = (clients ** 2 * clip ** 2 / block_size(padded)
             + clients * (granularity ** 2 / 4 + noise_std ** 2))
    return k * math.sqrt(proxy)


def plan_granularity(clip: float, noise_std: float, clients: int, dimension: int, bits: int,
                     wrap_probability: float = 1e-9, beta: float = math.exp(-0.5)) -> DDGPlan:
    """The finest grid on ``bits`` bits whose sum of ``clients`` wraps with probability at most
    ``wrap_probability``; ``noise_std`` is each client's noise in update units.

    Raises :class:`DDGMechanismError` naming the knob when no grid fits (too few bits for
    that many clients and that much noise) or when the grid is so coarse that the integer
    noise would be below variance 1 (raise ``bits``).
    """
    for name, v in (("clip", clip), ("noise_std", noise_std)):
        if not is_real(v) or not math.isfinite(v) or v <= 0:
            raise DDGMechanismError(f"{name}={v!r} must be a finite number > 0")
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise DDGMechanismError(f"clients={clients!r} must be an integer >= 1")
    if not is_real(wrap_probability) or not 0.0 < wrap_probability < 1.0:
        raise DDGMechanismError(f"wrap_probability={wrap_probability!r} must be in (0, 1)")
    padded = padded_dimension(dimension)
    half = (1 << (bits - 1)) - 1 if MIN_BITS <= bits <= MAX_BITS else 0
    if half <= 0:
        raise DDGMechanismError(f"bits={bits!r} must be an integer in [{MIN_BITS}, {MAX_BITS}]")
    gamma = sum_bound(clip, 0.0, noise_std, clients, padded, wrap_probability) / half
    for _ in range(100):  # the bound grows with gamma (rounding): iterate to a fixed point
        needed = sum_bound(clip, gamma, noise_std, clients, padded, wrap_probability) / half
        if needed <= gamma:
            break
        gamma = needed * (1 + 1e-12)
    else:  # pragma: no cover - the map is a contraction for any valid input
        raise DDGMechanismError("granularity planning did not converge")
    # a grid no finer than the fast sampler's range: the rounding error (gamma^2 / 4 per
    # coordinate) stays below 2^-32 of the noise variance, and a coarser grid never wraps more
    gamma = max(gamma, noise_std / math.sqrt(MAX_GRID_VARIANCE))
    if sum_bound(clip, gamma, noise_std, clients, padded, wrap_probability) > gamma * half:
        raise DDGMechanismError("granularity planning failed its own check")  # security
    # rounded up (never less noise than asked): to an integer above 1024, else to a multiple
    # of 1/1024 (small exact fractions keep the sampler on its int64 path)
    scaled = (noise_std / gamma) ** 2
    local_variance = (Fraction(math.ceil(scaled)) if scaled >= 1024
                      else Fraction(math.ceil(scaled * 1024), 1024))
    if local_variance < 1:
        raise DDGMechanismError(
            f"bits={bits} leave a grid of {gamma:.3g} for {clients} clients: the per-client "
            f"noise ({noise_std:.3g}) is below one grid step; raise bits or lower the clients "
            "per round")
    return DDGPlan(clip=clip, granularity=gamma, local_variance=local_variance, bits=bits,
                   dimension=dimension, beta=beta)



# -- noise provisioning (what each client adds, and what it checks) -------------------------
@dataclass(frozen=True)
class Provisioned:
    """A plan whose release meets a user-level target, and the epsilon it reaches."""

    plan: DDGPlan
    epsilon: float
    noise_std: float


def release_epsilon(plan: DDGPlan, *, sample_rate: float, min_contributors: int, rounds: int,
                    delta: float) -> float:
    """User-level epsilon after ``rounds`` releases under ``plan`` when only
    ``min_contributors`` noise shares are present in each sum (the fewest the round accepts)."""
    from fedpeft.privacy.accounting.ddg import epsilon

    event = plan.accounting_event(sample_rate, min_contributors, steps=rounds)
    return epsilon([event], delta).epsilon


def provision(*, target_epsilon: float, delta: float, rounds: int, sample_rate: float,
              clip: float, min_contributors: int, clients_per_round: int, dimension: int,
              bits: int, wrap_probability: float = 1e-9,
              beta: float = math.exp(-0.5)) -> Provisioned:
    """The least per-client noise (update units, bisection) whose plan meets
    ``target_epsilon`` at ``delta`` after ``rounds`` rounds, counting only
    ``min_contributors`` noise shares per sum (the SecAgg threshold minus one, minus the clients
    that may collude), and the field planned for up to ``clients_per_round`` summands.

    Fails closed: a :class:`DDGMechanismError` naming the knob when no noise level meets the
    target on ``bits`` bits, or when the result does not verify.
    """
    if not is_real(target_epsilon) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise DDGMechanismError(f"target_epsilon={target_epsilon!r} must be a finite number > 0")
    for name, v in (("rounds", rounds), ("min_contributors", min_contributors),
                    ("clients_per_round", clients_per_round)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DDGMechanismError(f"{name}={v!r} must be an integer >= 1")
    if min_contributors > clients_per_round:
        raise DDGMechanismError(f"min_contributors={min_contributors} exceeds "
                                f"clients_per_round={clients_per_round}")

    def attempt(std: float) -> Provisioned | None:
        try:
            plan = plan_granularity(clip, std, clients_per_round, dimension, bits,
                                    wrap_probability, beta)
        except DDGMechanismError:
            return None  # this noise level does not fit the field
        eps = release_epsilon(plan, sample_rate=sample_rate, min_contributors=min_contributors,
                              rounds=rounds, delta=delta)
        return Provisioned(plan, eps, std)

    hi = clip / math.sqrt(min_contributors)  # a noise multiplier of 1 for the summed noise
    best = attempt(hi)
    for _ in range(60):  # grow until the target is met (or the field cannot hold the noise)
        if best is not None and best.epsilon <= target_epsilon:
            break
        hi *= 2.0
        best = attempt(hi)
    if best is None or best.epsilon > target_epsilon:
        raise DDGMechanismError(
            f"no noise level reaches epsilon {target_epsilon} on bits={bits} with "
            f"{min_contributors} contributors of {clients_per_round}: raise bits or "
            "min_contributors, or lower the rounds or the sampling rate")
    lo = hi / 2.0
    for _ in range(40):  # bisect down to the least noise that still meets the target
        mid = math.sqrt(lo * hi)
        got = attempt(mid)
        if got is not None and got.epsilon <= target_epsilon:
            hi, best = mid, got
        else:
            lo = mid
        if hi - lo <= 1e-4 * hi:
            break
    # security: verify the returned plan against the target from scratch
    check = release_epsilon(best.plan, sample_rate=sample_rate,
                            min_contributors=min_contributors, rounds=rounds, delta=delta)
    if check > target_epsilon:
        raise DDGMechanismError(f"provisioned plan spends {check} > target {target_epsilon}")
    return best


def verify_provisioning(plan: DDGPlan, *, sample_rate: float, min_contributors: int,
                        rounds: int, delta: float, epsilon_max: float) -> float:
    """The client's check before it adds its noise: recompute what the offered plan spends
    from its own numbers and refuse (:class:`DDGMechanismError`) when it exceeds the client's
    ``epsilon_max`` -- a coordinator cannot make a client add less noise than its budget
    needs. Returns the epsilon."""
    eps = release_epsilon(plan, sample_rate=sample_rate, min_contributors=min_contributors,
                          rounds=rounds, delta=delta)
    if eps > epsilon_max:
        raise DDGMechanismError(
            f"refused: the offered plan (local variance {float(plan.local_variance):.4g} on a "
            f"grid of {plan.granularity:.3g}) spends epsilon {eps:.4g} over {rounds} rounds "
            f"with {min_contributors} contributors, above this client's budget {epsilon_max}")
    return eps
