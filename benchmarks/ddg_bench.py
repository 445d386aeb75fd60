"""Cost of exact discrete Gaussian noise (user-level DP, issue 15) next to the alternatives.

Side by side in one run, per coordinate of noise: the exact CKS 2020 sampler over a ChaCha20
stream (``fedpeft.privacy.discrete_gaussian``), scalar and batched, at a small and a large
integer-scale variance;
the record-level DP-SGD noise (``fedpeft.privacy.csprng``, ChaCha20 + secure-mode Gaussian);
NumPy's ``standard_normal`` (not a CSPRNG: the floor, never used for noise). The user-level
accountant's cost (``fedpeft.privacy.accounting.ddg.epsilon`` for one round, after a warm-up)
and one provisioning (``fedpeft.privacy.ddg_mechanism.provision``) are timed too.

Usage: python benchmarks/ddg_bench.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.privacy.accounting.ddg import DistributedDiscreteGaussianEvent, epsilon  # noqa: E402
from fedpeft.privacy.csprng import DPRandomness  # noqa: E402
from fedpeft.privacy.ddg_mechanism import provision  # noqa: E402
from fedpeft.privacy.discrete_gaussian import (  # noqa: E402
    ExactIntegers,
    discrete_gaussian_batch,
    discrete_gaussian_vector,
)


def _per_item(fn: Callable[[], object], items: int, repeats: int) -> float:
    """Median seconds per item over ``repeats`` runs of ``fn`` (each producing ``items``)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) / items)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (CI smoke)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "ddg.json")
    args = parser.parse_args()
    n, repeats = (2_000, 2) if args.quick else (50_000, 3)
    rng = ExactIntegers.from_os()
    dp = DPRandomness.from_os()
    normal = np.random.default_rng(0)  # the floor only; never used for DP noise
    rows = {
        "exact_ddg_sigma2_1e2": _per_item(lambda: discrete_gaussian_vector(n, 100, rng), n,
                                          repeats),
        "exact_ddg_sigma2_1e8": _per_item(lambda: discrete_gaussian_vector(n, 10**8, rng), n,
                                          repeats),
        "exact_ddg_batch_sigma2_1e2": _per_item(lambda: discrete_gaussian_batch(n, 100, rng), n,
                                                repeats),
        "exact_ddg_batch_sigma2_1e8": _per_item(lambda: discrete_gaussian_batch(n, 10**8, rng),
                                                n, repeats),
        "csprng_gaussian_secure": _per_item(lambda: dp.noise.gaussian((n,), 1.0), n, repeats),
        "numpy_standard_normal": _per_item(lambda: normal.standard_normal(n), n, repeats),
    }
    event = DistributedDiscreteGaussianEvent(0.1, 1.0, 1e-4, 1e6, 100, 500_000, steps=1)
    epsilon([event], 1e-6)  # warm-up: the first call imports Opacus' RDP conversion
    t = time.perf_counter()
    eps = epsilon([event], 1e-6).epsilon
    accountant_s = time.perf_counter() - t
    t = time.perf_counter()
    provisioned = provision(target_epsilon=8.0, delta=1e-6, rounds=20, sample_rate=0.1,
                            clip=1.0, min_contributors=80, clients_per_round=100,
                            dimension=500_000, bits=20)
    provision_s = time.perf_counter() - t
    floor = rows["numpy_standard_normal"]
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "samples": n,
        "microseconds_per_coordinate": {k: round(v * 1e6, 4) for k, v in rows.items()},
        "ratio_to_numpy": {k: round(v / floor, 1) for k, v in rows.items()},
        "seconds_for_500k_coordinates": {k: round(v * 500_000, 2) for k, v in rows.items()},
        "accountant_one_round_seconds": round(accountant_s, 3),
        "accountant_example_epsilon": round(eps, 4),
        "provision_seconds": round(provision_s, 3),
        "provision_example": {"epsilon": round(provisioned.epsilon, 4),
                              "noise_std_per_client": round(provisioned.noise_std, 5),
                              "granularity": provisioned.plan.granularity,
                              "local_variance": float(provisioned.plan.local_variance)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
