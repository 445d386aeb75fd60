"""Randomness for DP-SGD from a CSPRNG: Poisson batch sampling and Gaussian noise.

Both random choices of the subsampled Gaussian mechanism must be unpredictable to every
party the guarantee is stated against, the coordinator included:

* **which examples join each Poisson batch** (amplification by subsampling assumes the
  adversary does not know the batch), and
* **the Gaussian noise** (whoever can rebuild the noise can subtract it).

PyTorch's generators are not fit for this: the CPU generator is a Mersenne Twister that uses
only the low 32 bits of its seed, so a 2^32 search recovers any seed; and a generator seeded
from a public value (the run seed) is known to the coordinator outright.

This module draws both from the ChaCha20 keystream (RFC 8439), keyed by a 256-bit key and read
sequentially (:class:`ChaChaStream`, built on :class:`fedpeft.secagg.prg.ChaCha20Stream`, the
one ChaCha20 primitive of fedpeft; this module does not import ``cryptography`` itself). One
key serves both uses through two distinct nonces (domains, :data:`DOMAIN_SAMPLING` and
:data:`DOMAIN_NOISE`), so the two streams are independent. :class:`DPRandomness` holds the
pair and is passed explicitly to ``fedpeft.privacy.dp_sgd.dp_local_train``:

* :meth:`DPRandomness.from_os` (production): a fresh key from the OS CSPRNG
  (``secrets.token_bytes``), ``kind="os"``.
* :meth:`DPRandomness.from_seed` (**tests and benchmarks only**): the key is
  ``SHA-256(tag || seed)``, reproducible by anyone who knows the seed, ``kind="seeded"``.
  Never use it where the guarantee must hold against someone who knows the seed.

Values (all from the keystream read as little-endian 64-bit words):

* uniforms in [0, 1): ``(word >> 11) * 2^-53``, i.e. 53 random bits each, on the grid of
  float64 numbers ``k * 2^-53``;
* standard normals in float64 by Box-Muller on pairs of uniforms ``(u1, u2)``:
  ``sqrt(-2 ln(1 - u1)) * (cos, sin)(2 pi u2)``; ``1 - u1`` lies in ``(0, 1]`` so the log is
  finite (the largest magnitude is ``sqrt(2 * 53 ln 2) = 8.57``);
* Gaussian noise (:meth:`ChaChaStream.gaussian`) with the floating-point mitigation Opacus
  applies in ``secure_mode`` (Holohan & Braghin 2021, arXiv 2107.10138, sec. 5.1; Opacus
  ``_generate_noise``), **on by default**: each coordinate is the sum of 4 independent
  ``N(0, std^2)`` draws divided by 2, which is again ``N(0, std^2)`` but no longer a single
  Box-Muller output, so the lattice structure a floating-point attack exploits is hidden
  (attack cost ~2^159 rather than ~2^53 per Opacus' note). Computed in float64, cast to the
  requested dtype at the end. Unlike Opacus, no first sample is thrown away (that works
  around a quirk of ``torchcsprng``'s generator, which is not used here).

Keys never appear in ``repr`` or error messages.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
import torch

from fedpeft.core.errors import ConfigError
from fedpeft.secagg.prg import MAX_KEYSTREAM_BYTES, ChaCha20Stream

__all__ = [
    "CSPRNGError", "ChaChaStream", "DPRandomness", "GaussianSource", "RandomnessKind",
    "UniformSource", "DOMAIN_NOISE", "DOMAIN_SAMPLING", "KEY_BYTES",
]

#: ChaCha20 key length (256 bits).
KEY_BYTES = 32
#: The 16-byte ChaCha20 "nonce" argument of :class:`ChaCha20Stream`: 4-byte little-endian
#: block counter (starts at 0) + 12-byte nonce. Distinct nonces domain-separate the two
#: streams of one key.
DOMAIN_SAMPLING = bytes(4) + b"fpdp-sample\x00"
DOMAIN_NOISE = bytes(4) + b"fpdp-noise\x00\x00"
_DOMAINS = {DOMAIN_SAMPLING: "sampling", DOMAIN_NOISE: "noise"}
#: A stream never reads past its 32-bit block counter (2^32 blocks of 64 bytes = 256 GiB).
MAX_STREAM_BYTES = MAX_KEYSTREAM_BYTES
#: ``from_seed`` key derivation tags (distinct for int and bytes seeds).
_SEED_TAG_INT = b"fedpeft/dp-randomness/seed/int\x00"
_SEED_TAG_BYTES = b"fedpeft/dp-randomness/seed/bytes\x00"
#: Noise is generated in chunks of this many coordinates (bounds the float64 temporaries to
#: ~4 x 8 x 4 = 128 bytes per coordinate of one chunk); chunking never changes the values.
_NOISE_CHUNK = 1 << 17

RandomnessKind = Literal["os", "seeded"]


class CSPRNGError(ConfigError):
    """Bad input to the DP randomness: key length, seed type, sizes (the message says which)."""


class UniformSource(Protocol):
    """Source of the Poisson sampling uniforms (``DPRandomness.sampling``)."""

    def uniform(self, n: int) -> npt.NDArray[np.float64]:
        """The next ``n`` uniforms in [0, 1), float64."""
        ...


class GaussianSource(Protocol):
    """Source of the DP-SGD noise (``DPRandomness.noise``)."""

    def gaussian(self, shape: Sequence[int], std: float, dtype: torch.dtype = torch.float64,
                 *, device: torch.device | str | None = None,
                 secure: bool = True) -> torch.Tensor:
        """The next ``N(0, std^2)`` tensor of ``shape``, ``dtype`` and ``device``."""
        ...


def _check_key(key: object) -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        raise CSPRNGError(f"key must be {KEY_BYTES} bytes, got {type(key).__name__}; use "
                          "DPRandomness.from_os() (or from_seed() in tests)")
    if len(key) != KEY_BYTES:
        raise CSPRNGError(f"key length={len(key)} must be {KEY_BYTES} bytes (256 bits); use "
                          "DPRandomness.from_os() (or from_seed() in tests)")
    return bytes(key)


def _check_count(name: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise CSPRNGError(f"{name}={n!r} must be an integer >= 0")
    return n


class ChaChaStream(ChaCha20Stream):
    """Sequential reader of one ChaCha20 keystream (``key``, ``domain``).

    A :class:`fedpeft.secagg.prg.ChaCha20Stream` (the keystream itself) whose bad input raises
    :class:`CSPRNGError`, plus the DP draws: uniforms, normals and Gaussian noise.

    The reader keeps its position: reading ``a`` then ``b`` values gives the same values as
    reading ``a + b`` at once, for bytes, uniforms and normals alike (Box-Muller's second
    value of a pair is kept for the next call), and :meth:`gaussian` is chunking-invariant
    (coordinate ``i`` of a call uses the call's normals ``4i .. 4i+3``, or ``i`` without the
    mitigation). Not thread-safe; not meant to be copied or pickled.
    """

    def __init__(self, key: bytes, domain: bytes = DOMAIN_NOISE) -> None:
        key = _check_key(key)
        if not isinstance(domain, bytes) or len(domain) != 16:
            raise CSPRNGError("domain must be 16 bytes (4-byte counter + 12-byte nonce), e.g. "
                              "DOMAIN_SAMPLING or DOMAIN_NOISE")
        # security: ChaCha20 keystream = ChaCha20(key, domain) XOR 0; the key is not kept
        super().__init__(key, domain)
        self._domain = _DOMAINS.get(domain, domain.hex())
        self._spare: float | None = None  # second Box-Muller value of the last pair

    def __repr__(self) -> str:  # never the key
        return f"ChaChaStream(domain={self._domain!r}, position={self._position})"

    def read(self, nbytes: int) -> bytes:
        """The next ``nbytes`` bytes of the keystream."""
        nbytes = _check_count("nbytes", nbytes)
        if nbytes > self.remaining:  # security: the block counter never wraps
            raise CSPRNGError(f"keystream exhausted: reading {nbytes} bytes at position "
                              f"{self._position} passes the 2^32-block counter; use a fresh "
                              "DPRandomness (one per client and round)")
        return super().read(nbytes)

    def uniform(self, n: int) -> npt.NDArray[np.float64]:
        """``n`` uniforms in [0, 1) with 53 random bits each (multiples of 2^-53), float64."""
        n = _check_count("n", n)
        words = np.frombuffer(self.read(8 * n), dtype="<u8")
        return (words >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)

    def standard_normal(self, n: int) -> npt.NDArray[np.float64]:
        """``n`` independent N(0, 1) values in float64 (Box-Muller on :meth:`uniform` pairs)."""
        return self._normals(_check_count("n", n)).numpy()

    def _normals(self, n: int) -> torch.Tensor:
        out = torch.empty(n, dtype=torch.float64)
        start = 0
        if n and self._spare is not None:
            out[0], self._spare, start = self._spare, None, 1
        need = n - start
        if need:
            pairs = (need + 1) // 2
            u = torch.from_numpy(self.uniform(2 * pairs)).view(pairs, 2)
            radius = torch.log1p(-u[:, 0]).mul_(-2.0).sqrt_()  # 1 - u1 in (0, 1]: log finite
            angle = u[:, 1] * (2.0 * math.pi)
            z = torch.stack((radius * torch.cos(angle), radius.mul_(torch.sin(angle))), dim=1)
            z = z.view(-1)
            out[start:] = z[:need]
            if need % 2:
                self._spare = float(z[-1])
        return out

    def gaussian(self, shape: Sequence[int], std: float, dtype: torch.dtype = torch.float64,
                 *, device: torch.device | str | None = None,
                 secure: bool = True) -> torch.Tensor:
        """A tensor of independent ``N(0, std^2)`` values of ``shape``, ``dtype``, ``device``.

        ``secure`` (default): each value is the sum of 4 ``N(0, std^2)`` draws divided by 2
        (Opacus' ``secure_mode`` mitigation, see the module docstring). ``std == 0`` returns
        zeros without reading the stream (as Opacus' ``_generate_noise`` does).
        """
        dims = tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise CSPRNGError(f"shape={dims} has a negative dimension")
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not (
                math.isfinite(std) and std >= 0):
            raise CSPRNGError(f"std={std!r} must be a finite number >= 0")
        if std == 0:
            return torch.zeros(dims, dtype=dtype, device=device)
        count = math.prod(dims)
        flat = torch.empty(count, dtype=torch.float64)
        for lo in range(0, count, _NOISE_CHUNK):
            hi = min(count, lo + _NOISE_CHUNK)
            if secure:
                # security: floating-point mitigation, sum of 4 N(0, std^2) draws / 2
                z = self._normals(4 * (hi - lo)).view(hi - lo, 4).mul_(std)
                flat[lo:hi] = (z[:, 0] + z[:, 1] + z[:, 2] + z[:, 3]) / 2.0
            else:
                flat[lo:hi] = self._normals(hi - lo).mul_(std)
        return flat.reshape(dims).to(dtype=dtype, device=device)


def _seed_key(seed: int | bytes) -> bytes:
    if isinstance(seed, bool) or not isinstance(seed, (int, bytes)):
        raise CSPRNGError(f"seed must be an int or bytes, got {type(seed).__name__}")
    if isinstance(seed, int):
        material = _SEED_TAG_INT + str(seed).encode("ascii")
    else:
        material = _SEED_TAG_BYTES + seed
    return hashlib.sha256(material).digest()


@dataclass(frozen=True, eq=False)
class DPRandomness:
    """The two random streams of one DP-SGD run: Poisson sampling and Gaussian noise.

    Build it with :meth:`from_os` in production (one per client and round) and pass it to
    ``fedpeft.privacy.dp_sgd.dp_local_train``; record :attr:`kind` with the result. The streams are
    consumed by use: a second training run with the same object continues both streams.
    Direct construction (any :class:`UniformSource` / :class:`GaussianSource`) is for tests
    and benchmarks.
    """

    sampling: UniformSource
    noise: GaussianSource
    kind: RandomnessKind

    def __post_init__(self) -> None:
        if self.kind not in ("os", "seeded"):
            raise CSPRNGError(f"kind={self.kind!r} must be 'os' or 'seeded'")
        if self.sampling is self.noise:  # type: ignore[comparison-overlap]
            raise CSPRNGError("sampling and noise must be separate streams (one stream for "
                              "both would correlate the batches with the noise)")

    @classmethod
    def from_key(cls, key: bytes, *, kind: RandomnessKind) -> DPRandomness:
        """Both streams from one 256-bit ``key`` (domain-separated by nonce)."""
        key = _check_key(key)
        return cls(sampling=ChaChaStream(key, DOMAIN_SAMPLING),
                   noise=ChaChaStream(key, DOMAIN_NOISE), kind=kind)

    @classmethod
    def from_os(cls) -> DPRandomness:
        """Fresh, unpredictable streams: a 256-bit key from the OS CSPRNG (production)."""
        key = secrets.token_bytes(KEY_BYTES)  # security: fresh key from the OS CSPRNG
        return cls.from_key(key, kind="os")

    @classmethod
    def from_seed(cls, seed: int | bytes) -> DPRandomness:
        """Reproducible streams for **tests and benchmarks only**; never in production.

        The key is ``SHA-256(tag || seed)`` (``str(seed)`` for an int), so distinct seeds give
        distinct 256-bit keys, every bit of the seed counts (unlike ``torch.manual_seed``),
        and ``1`` and ``b"1"`` differ. Anyone who knows the seed can rebuild the batches and
        the noise: the DP guarantee does not hold against them.
        """
        return cls.from_key(_seed_key(seed), kind="seeded")
