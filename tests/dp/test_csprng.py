"""The DP randomness (``fedpeft.privacy.csprng``): keystream, streaming, seed entropy, noise statistics.

Statistical tests use fixed seeds; each check has a stated false-alarm rate of 1e-6.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from scipy import stats

from fedpeft.core.errors import ConfigError, FedPeftError
from fedpeft.privacy import csprng
from fedpeft.privacy.csprng import (
    DOMAIN_NOISE,
    DOMAIN_SAMPLING,
    MAX_STREAM_BYTES,
    ChaChaStream,
    CSPRNGError,
    DPRandomness,
)
from fedpeft.secagg.prg import ChaCha20Stream

#: Two-sided standard-normal quantile for a false-alarm rate of 1e-6.
Z_1E6 = 4.89
ALPHA = 1e-6
KEY = bytes(range(32))


# ---------------------------------------------------------------- keystream, streaming

def test_keystream_is_rfc8439_chacha20() -> None:
    """RFC 8439 appendix A.1, test vector #1: all-zero key, nonce and counter."""
    block = ChaChaStream(bytes(32), bytes(16)).read(64)
    assert block.hex() == ("76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
                           "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586")


def test_keystream_comes_from_the_one_chacha20_primitive() -> None:
    """csprng builds no cipher of its own: it imports nothing from ``cryptography``."""
    tree = ast.parse(Path(csprng.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [str(n.module) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] == "cryptography"], imported
    assert issubclass(ChaChaStream, ChaCha20Stream)
    for domain in (DOMAIN_SAMPLING, DOMAIN_NOISE, bytes(16)):
        assert ChaChaStream(KEY, domain).read(200) == ChaCha20Stream(KEY, domain).read(200)


def test_domains_separate_the_streams_of_one_key() -> None:
    r = DPRandomness.from_key(KEY, kind="seeded")
    assert isinstance(r.sampling, ChaChaStream) and isinstance(r.noise, ChaChaStream)
    a = ChaChaStream(KEY, DOMAIN_SAMPLING).read(256)
    b = ChaChaStream(KEY, DOMAIN_NOISE).read(256)
    assert a != b
    assert np.array_equal(r.sampling.uniform(8), ChaChaStream(KEY, DOMAIN_SAMPLING).uniform(8))
    assert np.array_equal(r.noise.uniform(8), ChaChaStream(KEY, DOMAIN_NOISE).uniform(8))


@pytest.mark.parametrize("split", [0, 1, 3, 7, 64, 999])
def test_reading_in_parts_equals_reading_at_once(split: int) -> None:
    total = 1000
    readers: dict[str, Callable[[ChaChaStream, int], npt.NDArray[np.float64] | bytes]] = {
        "read": lambda s, k: s.read(k),
        "uniform": lambda s, k: s.uniform(k),
        "standard_normal": lambda s, k: s.standard_normal(k),
        "gaussian": lambda s, k: s.gaussian((k,), 2.0).numpy(),
        "gaussian-plain": lambda s, k: s.gaussian((k,), 2.0, secure=False).numpy(),
    }
    for name, read in readers.items():
        whole = read(ChaChaStream(KEY), total)
        s = ChaChaStream(KEY)
        first, second = read(s, split), read(s, total - split)
        if isinstance(whole, bytes):
            assert isinstance(first, bytes) and isinstance(second, bytes)
            assert first + second == whole, name
        else:
            assert np.array_equal(np.concatenate([first, second]), whole), name  # type: ignore[list-item]


def test_gaussian_is_chunking_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = ChaChaStream(KEY).gaussian((50, 7), 1.5, torch.float32)
    monkeypatch.setattr(csprng, "_NOISE_CHUNK", 13)
    assert torch.equal(ChaChaStream(KEY).gaussian((50, 7), 1.5, torch.float32), whole)


def test_uniforms_have_53_random_bits() -> None:
    u = ChaChaStream(KEY).uniform(100_000)
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    k = u * 2.0 ** 53
    assert np.array_equal(k, np.floor(k))  # on the 2^-53 grid
    # The lowest of the 53 bits is random too (a 32- or 52-bit uniform would never set it):
    # Binomial(1e5, 1/2) within 4.89 sd of 5e4 (false alarm 1e-6).
    odd = int((k.astype(np.uint64) & np.uint64(1)).sum())
    assert abs(odd - 50_000) < Z_1E6 * math.sqrt(100_000 / 4)


def test_secure_gaussian_is_four_draws_summed_over_two() -> None:
    std, n = 0.7, 301
    got = ChaChaStream(KEY).gaussian((n,), std).numpy()
    z = ChaChaStream(KEY).standard_normal(4 * n).reshape(n, 4)
    want = (std * z).sum(axis=1) / 2.0
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=1e-15)
    plain = ChaChaStream(KEY).gaussian((n,), std, secure=False).numpy()
    np.testing.assert_allclose(plain, std * ChaChaStream(KEY).standard_normal(n), rtol=1e-15)


def test_gaussian_shape_dtype_and_zero_std() -> None:
    s = ChaChaStream(KEY)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = s.gaussian((3, 4, 5), 1.0, dtype, device="cpu")
        assert x.shape == (3, 4, 5) and x.dtype == dtype and x.device.type == "cpu"
    pos = s.position
    zeros = s.gaussian((2, 3), 0.0, torch.float32)
    assert torch.equal(zeros, torch.zeros(2, 3)) and s.position == pos  # no draw (as Opacus)
    assert s.gaussian((0,), 1.0).shape == (0,)


# ---------------------------------------------------------------- seed entropy

def _differ(a: ChaChaStream, b: ChaChaStream) -> bool:
    """No two of the first 256 uniforms agree (a shared stream would agree on all)."""
    return not np.any(a.uniform(256) == b.uniform(256))


def test_keys_equal_in_their_low_64_bits_give_different_streams() -> None:
    """Keys agreeing in their first 8 and last 8 bytes (the low 32 and 64 bits whichever way
    the key is read as an integer) but not elsewhere: different streams."""
    other = bytearray(KEY)
    other[16] ^= 0x01
    assert bytes(other)[:8] == KEY[:8] and bytes(other)[-8:] == KEY[-8:]
    for domain in (DOMAIN_SAMPLING, DOMAIN_NOISE):
        assert _differ(ChaChaStream(KEY, domain), ChaChaStream(bytes(other), domain))


def test_from_seed_uses_every_bit_of_the_seed() -> None:
    """The flaw this replaces: torch's CPU generator keeps only the low 32 bits of a seed."""
    s = 0x1234_5678_9ABC_DEF0
    old_a = torch.rand(8, generator=torch.Generator().manual_seed(s & 0xFFFF_FFFF))
    old_b = torch.rand(8, generator=torch.Generator().manual_seed(s))
    assert torch.equal(old_a, old_b)  # the old way: 2^32 seeds only
    seeds: list[int | bytes] = [s, s + 2 ** 32, s + 2 ** 64, s + 2 ** 200, -s, str(s).encode(),
                                bytes(8) + b"\x01" + bytes(7), bytes(8) + b"\x02" + bytes(7)]
    rs = [DPRandomness.from_seed(x) for x in seeds]
    for i in range(len(rs)):
        for j in range(i + 1, len(rs)):
            for attr in ("sampling", "noise"):
                a, b = getattr(rs[i], attr), getattr(rs[j], attr)
                assert _differ(a, b), (seeds[i], seeds[j], attr)


def test_from_seed_is_reproducible_and_from_os_is_fresh() -> None:
    a, b = DPRandomness.from_seed(7), DPRandomness.from_seed(7)
    assert a.kind == "seeded"
    assert np.array_equal(a.sampling.uniform(64), b.sampling.uniform(64))
    assert torch.equal(a.noise.gaussian((64,), 1.0), b.noise.gaussian((64,), 1.0))
    x, y = DPRandomness.from_os(), DPRandomness.from_os()
    assert x.kind == "os" and y.kind == "os"
    assert isinstance(x.sampling, ChaChaStream) and isinstance(y.sampling, ChaChaStream)
    assert isinstance(x.noise, ChaChaStream) and isinstance(y.noise, ChaChaStream)
    assert _differ(x.sampling, y.sampling) and _differ(x.noise, y.noise)


def test_repr_never_shows_the_key() -> None:
    key = bytes(range(100, 132))
    text = repr(DPRandomness.from_key(key, kind="seeded"))
    assert key.hex() not in text and str(key) not in text and "position=0" in text


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("call", [
    lambda: ChaChaStream(bytes(31)),
    lambda: ChaChaStream(bytes(33)),
    lambda: ChaChaStream("x" * 32),  # type: ignore[arg-type]
    lambda: ChaChaStream(KEY, bytes(12)),
    lambda: DPRandomness.from_key(bytes(16), kind="os"),
    lambda: DPRandomness.from_seed(1.5),  # type: ignore[arg-type]
    lambda: DPRandomness.from_seed(True),
    lambda: DPRandomness.from_seed("seed"),  # type: ignore[arg-type]
    lambda: DPRandomness(sampling=ChaChaStream(KEY), noise=ChaChaStream(KEY),
                         kind="public"),  # type: ignore[arg-type]
    lambda: ChaChaStream(KEY).uniform(-1),
    lambda: ChaChaStream(KEY).read(-1),
    lambda: ChaChaStream(KEY).gaussian((3,), -1.0),
    lambda: ChaChaStream(KEY).gaussian((3,), math.nan),
    lambda: ChaChaStream(KEY).gaussian((-3,), 1.0),
])
def test_bad_input_raises_a_typed_error(call: Callable[[], object]) -> None:
    with pytest.raises(CSPRNGError) as info:
        call()
    assert isinstance(info.value, ConfigError) and isinstance(info.value, FedPeftError)


def test_one_stream_for_both_uses_is_rejected() -> None:
    s = ChaChaStream(KEY)
    with pytest.raises(CSPRNGError, match="separate streams"):
        DPRandomness(sampling=s, noise=s, kind="seeded")


def test_stream_refuses_to_pass_its_block_counter() -> None:
    s = ChaChaStream(KEY)
    s._position = MAX_STREAM_BYTES - 4  # as if 256 GiB had been read
    with pytest.raises(CSPRNGError, match="exhausted"):
        s.read(8)


# ---------------------------------------------------------------- noise statistics

def _gaussian_failures(x: npt.NDArray[np.float64], std: float) -> list[str]:
    """Failed checks of ``x`` ~ iid N(0, std^2), each with false-alarm rate 1e-6."""
    n = len(x)
    out = []
    if abs(x.mean()) >= Z_1E6 * std / math.sqrt(n):
        out.append(f"mean {x.mean():.3g}")
    # Sample variance ~ N(std^2, 2 std^4 / (n - 1)) for Gaussian data (n large).
    if abs(x.var(ddof=1) / std ** 2 - 1) >= Z_1E6 * math.sqrt(2 / (n - 1)):
        out.append(f"variance ratio {x.var(ddof=1) / std ** 2:.4f}")
    p = stats.kstest(x, "norm", args=(0.0, std)).pvalue
    if p <= ALPHA:
        out.append(f"KS p={p:.2g}")
    return out


@pytest.mark.statistical
@pytest.mark.parametrize("secure", [True, False])
@pytest.mark.parametrize("std", [1.0, 0.37])
def test_gaussian_noise_is_n_0_std2(secure: bool, std: float) -> None:
    """200k draws (fixed seed): mean 0, variance std^2, KS against N(0, std^2)."""
    x = DPRandomness.from_seed(2024).noise.gaussian((200_000,), std, secure=secure).numpy()
    assert _gaussian_failures(x, std) == []


@pytest.mark.statistical
def test_gaussian_checks_can_fail() -> None:
    """The same checks reject what a broken sampler would give (so they are not vacuous)."""
    n, std = 200_000, 1.0
    s = DPRandomness.from_seed(5).noise
    z = s.standard_normal(4 * n).reshape(n, 4)
    assert _gaussian_failures(z.sum(axis=1), std)  # 4 draws summed but not halved
    assert _gaussian_failures(1.03 * z[:, 0], std)  # 3 % too much noise
    u = DPRandomness.from_seed(6).noise.uniform(n)
    laplace = -np.sign(u - 0.5) * np.log1p(-2 * np.abs(u - 0.5)) / math.sqrt(2)  # variance 1
    assert _gaussian_failures(laplace, std)
