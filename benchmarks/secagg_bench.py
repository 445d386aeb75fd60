"""Benchmark of fedpeft.secagg (SecAgg+) next to Flower 1.42's own SecAgg+ primitives.

Ours: the full protocol through ``run_in_memory`` (every client and the server, real bytes).
Flower: its client-mod stage functions (``_setup``, ``_share_keys``, ``_collect_masked_vectors``,
``_unmask`` from ``flwr.client.mod.secure_aggregation.secaggplus_mod``) run for every client on
the same neighbour graph and threshold, and the server's unmasking loop of
``SecAggPlusWorkflow.unmask_stage`` replayed with Flower's primitives (``combine_shares``,
``pseudo_rand_gen``, ``generate_shared_key``, ndarray arithmetic). Not measured for Flower:
message serialisation through its Grid, the workflow's other stages' bookkeeping.
Dropouts happen after key sharing (the most expensive case for the server).

Usage: python benchmarks/secagg_bench.py [--quick] [--no-flower] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.secagg import SecAggConfig, Stage, run_in_memory  # noqa: E402
from fedpeft.secagg.config import abort_probability  # noqa: E402


def _drop_set(ids: list[int], rate: float, seed: int) -> list[int]:
    k = int(round(rate * len(ids)))
    rng = np.random.default_rng(seed)  # benchmark-only choice of who drops (not security relevant)
    return sorted(rng.choice(ids, size=k, replace=False).tolist()) if k else []


def bench_ours(n: int, rate: float, length: int, base: np.ndarray, clip: float) -> dict[str, Any]:
    max_abort = 0.01 if n >= 20 else 0.05  # 1% is unreachable below n=20 with 2t > k+1
    # corrupt_fraction 0: the planner its stored table used (secagg_active_bench.py measures 0.05)
    cfg = SecAggConfig(clip=clip, expected_dropout=0.2, max_abort_prob=max_abort, corrupt_fraction=0.0)
    ids = list(range(1, n + 1))
    ups = {c: base for c in ids}
    drop = _drop_set(ids, rate, seed=n)
    t0 = time.perf_counter()
    run = run_in_memory(cfg, ups, session_id=b"bench-session-%d" % n, dropouts={Stage.COLLECT_MASKED: drop})
    wall = time.perf_counter() - t0
    res = run.result
    survivors = list(res.survivors)
    client_s = [run.client_seconds[c] for c in survivors]
    plain_mean = np.clip(base.astype(np.float64), -clip, clip)
    err = float(np.max(np.abs(res.float_mean() - plain_mean)))
    upload = max(run.upload_bytes[c] for c in survivors)
    return {
        "n": n, "dropout": rate, "dropped": len(drop), "vector_length": length,
        "degree": run.server.degree, "threshold": run.server.threshold,
        "abort_probability_bound_at_20pct": abort_probability(n, run.server.degree,
                                                              run.server.threshold, 0.2),
        "client_seconds_mean": float(np.mean(client_s)), "client_seconds_max": float(np.max(client_s)),
        "server_seconds_by_stage": run.server_seconds,
        "server_seconds_total": float(sum(run.server_seconds.values())),
        "server_unmask_seconds": run.server_seconds["unmask"],
        "upload_bytes_per_client": upload, "upload_ratio_vs_float32": upload / (4 * length),
        "max_abs_error_of_mean": err, "grid_step": res.plan.step, "wall_seconds": wall,
    }


def bench_flower(n: int, rate: float, length: int, base: np.ndarray, degree: int, threshold: int,
                 neighbours: dict[int, frozenset[int]]) -> dict[str, Any]:
    import importlib

    from flwr.app import ConfigRecord
    from flwr.common import ndarray_to_bytes, ndarrays_to_parameters
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    fm = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    ids = list(range(1, n + 1))
    drop = set(_drop_set(ids, rate, seed=n))
    nbr = {c: set(neighbours[c]) | {c} for c in ids}
    mod_range = 1 << 32
    states: dict[int, Any] = {}
    client_s = {c: 0.0 for c in ids}
    upload = {c: 0 for c in ids}

    def timed(c: int, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        client_s[c] += time.perf_counter() - t0
        return out

    setup = ConfigRecord({Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: degree + 1, Key.THRESHOLD: threshold,
                          Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: mod_range,
                          Key.MAX_WEIGHT: 1.0})
    pks = {}
    for c in ids:
        states[c] = fm.SecAggPlusState()
        states[c].nid = c
        out = timed(c, fm._setup, states[c], setup)
        pks[c] = (out[Key.PUBLIC_KEY_1], out[Key.PUBLIC_KEY_2])
    cts: dict[int, dict[int, bytes]] = {c: {} for c in ids}
    for c in ids:
        rec = ConfigRecord({str(j): list(pks[j]) for j in sorted(nbr[c])})
        out = timed(c, fm._share_keys, states[c], rec)
        upload[c] += sum(len(x) for x in out[Key.CIPHERTEXT_LIST])
        for dst, ct in zip(out[Key.DESTINATION_LIST], out[Key.CIPHERTEXT_LIST], strict=True):
            cts[dst][c] = ct
    params = ndarrays_to_parameters([base])
    masked: dict[int, list[np.ndarray]] = {}
    for c in ids:
        srcs = sorted(cts[c])
        rec = ConfigRecord({Key.CIPHERTEXT_LIST: [cts[c][s] for s in srcs], Key.SOURCE_LIST: srcs})
        out = timed(c, fm._collect_masked_vectors, states[c], rec, 1, params)
        if c not in drop:
            from flwr.common import bytes_to_ndarray
            upload[c] += sum(len(b) for b in out[Key.MASKED_PARAMETERS])
            masked[c] = [bytes_to_ndarray(b) for b in out[Key.MASKED_PARAMETERS]]
    active = set(ids) - drop
    t_sum = time.perf_counter()
    total = masked[min(active)]
    for c in sorted(active - {min(active)}):
        total = parameters_addition(total, masked[c])
    t_sum = time.perf_counter() - t_sum
    shares: dict[int, list[bytes]] = {c: [] for c in ids}
    for c in sorted(active):
        rec = ConfigRecord({Key.ACTIVE_NODE_ID_LIST: sorted(nbr[c] & active),
                            Key.DEAD_NODE_ID_LIST: sorted(nbr[c] & drop)})
        out = timed(c, fm._unmask, states[c], rec)
        upload[c] += sum(len(s) for s in out[Key.SHARE_LIST])
        for owner, share in zip(out[Key.NODE_ID_LIST], out[Key.SHARE_LIST], strict=True):
            shares[owner].append(share)
    # server unmasking, as in SecAggPlusWorkflow.unmask_stage
    t0 = time.perf_counter()
    vec = total
    for nid, share_list in shares.items():
        if len(share_list) < threshold:
            raise RuntimeError(f"flower: not enough shares for {nid}")
        secret = combine_shares(share_list)
        if nid in active:
            vec = parameters_subtraction(vec, pseudo_rand_gen(secret, mod_range, get_parameters_shape(vec)))
        else:
            for nb in sorted(nbr[nid] - {nid}):
                key = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(pks[nb][0]))
                mask = pseudo_rand_gen(key, mod_range, get_parameters_shape(vec))
                vec = parameters_addition(vec, mask) if nid > nb else parameters_subtraction(vec, mask)
    vec = parameters_mod(vec, mod_range)
    unmask_s = time.perf_counter() - t0
    client_list = [client_s[c] for c in sorted(active)]
    up = max(upload[c] for c in active)
    _ = ndarray_to_bytes
    return {
        "n": n, "dropout": rate, "client_seconds_mean": float(np.mean(client_list)),
        "client_seconds_max": float(np.max(client_list)), "server_sum_seconds": t_sum,
        "server_unmask_seconds": unmask_s, "upload_bytes_per_client": up,
        "upload_ratio_vs_float32": up / (4 * length),
        "measured": "flower client-mod stage functions per client + replay of unmask_stage loop",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (n=10,20; 2e4 params)")
    ap.add_argument("--no-flower", action="store_true", help="skip the Flower comparison")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "secagg.json")
    args = ap.parse_args(argv)
    ns = [10, 20] if args.quick else [10, 50, 100, 200]
    length = 20_000 if args.quick else 500_000
    clip = 1e-2
    base = (np.random.default_rng(0).standard_normal(length) * 1e-3).astype(np.float32)
    rows: list[dict[str, Any]] = []
    for n in ns:
        for rate in (0.0, 0.2):
            ours = bench_ours(n, rate, length, base, clip)
            row: dict[str, Any] = {"ours": ours}
            print(f"n={n:4d} drop={rate:.0%} ours: client {ours['client_seconds_mean']:.3f}s "
                  f"server {ours['server_seconds_total']:.3f}s (unmask {ours['server_unmask_seconds']:.3f}s) "
                  f"k={ours['degree']} t={ours['threshold']} up x{ours['upload_ratio_vs_float32']:.4f}",
                  flush=True)
            if not args.no_flower:
                from fedpeft.secagg.graph import neighbour_graph
                g = neighbour_graph(list(range(1, n + 1)), ours["degree"], bytes(32))
                fl = bench_flower(n, rate, length, base, ours["degree"], ours["threshold"], g)
                row["flower"] = fl
                print(f"{'':17s} flower: client {fl['client_seconds_mean']:.3f}s unmask "
                      f"{fl['server_unmask_seconds']:.3f}s "
                      f"up x{fl['upload_ratio_vs_float32']:.4f}", flush=True)
            rows.append(row)
    meta = {"python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor(), "quick": args.quick, "vector_length": length, "clip": clip}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
