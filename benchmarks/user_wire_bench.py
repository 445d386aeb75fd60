"""Bits on the wire and the error of user-level DP's encoding (issue 15, item 4).

Side by side in one run, for two adapters (the chat-lora LoRA on SmolLM2, 460,800
coordinates; the sst2-lora FFA-LoRA + head on MiniLM-L6, 37,634) and several field sizes:

* the plan (``fedpeft.privacy.user_level.round_plan``: epsilon 8 at delta 1e-5 over 3
  releases, 100 clients a round, the SecAgg threshold's noise shares), its grid and noise;
* the masked input's bytes per client (the real ``encode_masked`` message, bit-packed) against
  float32 (4 bytes a coordinate) and against Flower's SecAgg+ (2.0x float32, its docs);
* the whole SecAgg+ upload per client of one real round of ``--clients`` clients;
* the error of the decoded sum of ``--clients`` real client encodings against the exact sum
  of their clipped updates: its mean square per coordinate over the plan's noise variance
  (1 = only the privacy noise; above 1 = rounding), and the coordinates that wrapped.

Usage: python benchmarks/user_wire_bench.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.privacy.ddg_mechanism import clip_l2  # noqa: E402
from fedpeft.privacy.user_level import (  # noqa: E402
    UserDPConfig,
    decode_sum,
    encode_update,
    round_plan,
)
from fedpeft.secagg import messages as msg  # noqa: E402
from fedpeft.secagg.config import SecAggConfig  # noqa: E402
from fedpeft.secagg.driver import run_in_memory  # noqa: E402
from fedpeft.secagg.quantize import decode_signed  # noqa: E402

ADAPTERS = {"chat-lora (SmolLM2, LoRA r=8 q/v)": 460_800,
            "sst2-lora (MiniLM-L6, FFA-LoRA + head)": 37_634}
FLOWER_SECAGG_RATIO = 2.0  # Flower's SecAgg+ upload / float32 (issue 15)


def measure(dimension: int, bits: int, clients: int, planned: int,
            rng: np.random.Generator) -> dict[str, Any]:
    """One (adapter, field) cell: the plan, the bytes and the measured error."""
    cfg = UserDPConfig(enabled=True, target_epsilon=8.0, delta=1e-5, clip=1.0,
                       participations=3)
    threshold = int(SecAggConfig(clip=1.0, bits=bits).resolve(planned).threshold or 0)
    plan = round_plan(cfg, planned_clients=planned, threshold=threshold,
                      dimension=dimension, bits=bits)
    session = os.urandom(24)
    updates = [rng.standard_normal(dimension) * (1.5 / np.sqrt(dimension))
               for _ in range(clients)]  # norms about 1.5: every update is clipped to 1
    t0 = time.perf_counter()
    words = {i + 1: encode_update(u, plan, session) for i, u in enumerate(updates)}
    encode_s = (time.perf_counter() - t0) / clients
    masked = len(msg.encode_masked(session, 1, words[1], bits))
    secagg = SecAggConfig(clip=1.0, bits=bits, expected_dropout=0.1,
                          max_abort_prob=0.5).resolve(clients)
    run = run_in_memory(secagg, words, session_id=session, field_inputs=True)
    got = decode_sum(run.result.modular_sum, plan, session)
    exact = np.sum([clip_l2(u, 1.0) for u in updates], axis=0)
    noise_var = clients * float(plan.ddg.local_variance) * plan.ddg.granularity ** 2
    err = got - exact
    signed = decode_signed(run.result.modular_sum, bits)
    edge = (1 << (bits - 1)) - 1
    return {
        "dimension": dimension, "padded": plan.ddg.padded, "bits": bits,
        "planned_clients": planned, "threshold": threshold,
        "min_contributors": plan.min_contributors, "epsilon": plan.provisioned.epsilon,
        "noise_std_per_client": plan.provisioned.noise_std,
        "granularity": plan.ddg.granularity,
        "local_variance": float(plan.ddg.local_variance),
        "masked_bytes": masked, "float32_bytes": 4 * dimension,
        "ratio_to_float32": masked / (4 * dimension),
        "ratio_to_flower_secagg": masked / (4 * dimension * FLOWER_SECAGG_RATIO),
        "upload_bytes_per_client": float(np.mean(list(run.upload_bytes.values()))),
        "upload_ratio_to_float32": float(np.mean(list(run.upload_bytes.values())))
        / (4 * dimension),
        "clients_summed": clients,
        "mse_over_noise_variance": float(np.mean(err ** 2)) / noise_var,
        "wrapped_coordinates": int(np.count_nonzero(np.abs(signed) >= edge)),
        "encode_seconds_per_client": encode_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke)")
    parser.add_argument("--clients", type=int, default=10, help="clients summed per cell")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "user_wire.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    adapters = {"tiny": 3000} if args.quick else ADAPTERS
    bits_list = (16, 20) if args.quick else (16, 18, 20, 32)
    clients = 4 if args.quick else args.clients
    rows = []
    for name, dim in adapters.items():
        for bits in bits_list:
            row = {"adapter": name, **measure(dim, bits, clients, 100, rng)}
            rows.append(row)
            print(f"{name:40s} bits {bits:2d}: masked {row['ratio_to_float32']:.3f}x float32 "
                  f"({row['ratio_to_flower_secagg']:.3f}x Flower SecAgg+), whole upload "
                  f"{row['upload_ratio_to_float32']:.3f}x; MSE / noise variance "
                  f"{row['mse_over_noise_variance']:.5f}; wrapped {row['wrapped_coordinates']};"
                  f" noise std {row['noise_std_per_client']:.4f}, eps {row['epsilon']:.3f}; "
                  f"encode {row['encode_seconds_per_client']:.2f} s", flush=True)
    doc = {"benchmark": "user_wire", "quick": args.quick,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "numpy": np.__version__},
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
