"""Cost of SecAgg+ hardened against a lying coordinator (issue 19), side by side in one run.

Three variants of one real round per n (every client and the server in one process, real wire
messages, ``run_in_memory``), 20 % of the clients dropping after key sharing:

* ``before``: the honest-but-curious planner (``corrupt_fraction=0``), unsigned keys;
* ``planner``: the threat-model planner (``corrupt_fraction=0.05``: the threshold tolerates
  ``floor(0.05 n)`` colluders placed around any client), unsigned keys;
* ``active``: authenticated rounds (certified Ed25519 node keys, signed
  advertisements verified by every neighbour, the consistency check) and their planner
  (same corrupt fraction; the consistency check lowers the threshold floor to t > c).

Reported: degree and threshold, mean client time, server time (total and unmask), bytes up
and down per client, and the ratios to ``before``; for ``active`` also the time one device
takes to verify the certificates it sees (its neighbours' and a quorum's, cold: simulated
clients share one trust anchor, whose cache hides it). Every aggregate is checked exact.

Usage: python benchmarks/secagg_active_bench.py [--quick] [--out PATH]
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

from fedpeft.deploy.certs import build_identities  # noqa: E402
from fedpeft.runconfig.secagg_identity import utc_now  # noqa: E402
from fedpeft.secagg import SecAggConfig, Stage, run_in_memory  # noqa: E402
from fedpeft.secagg.config import consistency_quorum  # noqa: E402
from fedpeft.secagg.identity import NodeIdentity, TrustAnchor  # noqa: E402
from fedpeft.secagg.quantize import decode_signed, quantize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"before": (0.0, False), "planner": (0.05, False), "active": (0.05, True)}


def bench(n: int, length: int, variant: str, pki: tuple[TrustAnchor, dict[int, NodeIdentity]],
          dropout: float = 0.2) -> dict[str, Any]:
    gamma, authenticated = VARIANTS[variant]
    max_abort = 0.01 if n >= 20 else 0.05
    cfg = SecAggConfig(clip=1.0, expected_dropout=0.2, max_abort_prob=max_abort, corrupt_fraction=gamma)
    ids = list(range(1, n + 1))
    rng = np.random.default_rng(n)  # benchmark data and the choice of who drops: not security relevant
    ups = {c: (rng.standard_normal(length) * 0.1).astype(np.float32) for c in ids}
    seeds = {c: c.to_bytes(32, "big") for c in ids}
    drop = set(rng.choice(ids, size=int(round(dropout * n)), replace=False).tolist())
    trust, nodes = pki
    t0 = time.perf_counter()
    run = run_in_memory(cfg, ups, session_id=b"active-bench-%d" % n, rounding_seeds=seeds,
                        dropouts={Stage.COLLECT_MASKED: drop},
                        identities=nodes if authenticated else None,
                        trust=trust if authenticated else None)
    wall = time.perf_counter() - t0
    res = run.result
    expect = np.zeros(length, dtype=np.int64)
    for c in res.survivors:
        expect += decode_signed(quantize(ups[c].astype(np.float64), res.plan, seeds[c]), 32)
    if not np.array_equal(res.int_sum, expect):
        raise RuntimeError(f"n={n} {variant}: the aggregate is not the exact sum")
    clients = list(res.survivors)
    cold = 0.0
    if authenticated:
        # one device verifies each certificate it sees once (simulated clients share one
        # anchor, so their times above do not show it): its neighbours' and a quorum's
        quorum = consistency_quorum(n, gamma)
        fresh = TrustAnchor(trust.ca, utc_now)
        ders = [nodes[c].certificate for c in ids[: min(n, run.server.degree + quorum)]]
        t0 = time.perf_counter()
        for der in ders:
            fresh.verify(der)
        cold = time.perf_counter() - t0
    return {
        "n": n, "variant": variant, "corrupt_fraction": gamma, "authenticated": authenticated,
        "vector_length": length, "dropped": len(drop), "degree": run.server.degree,
        "threshold": run.server.threshold,
        "client_seconds_mean": float(np.mean([run.client_seconds[c] for c in clients])),
        "server_seconds_total": float(sum(run.server_seconds.values())),
        "server_unmask_seconds": float(run.server_seconds["unmask"]),
        "upload_bytes_per_client": float(np.mean([run.upload_bytes[c] for c in clients])),
        "download_bytes_per_client": float(np.mean([run.download_bytes[c] for c in clients])),
        "device_certificate_seconds": cold, "wall_seconds": wall, "exact_sum_verified": True,
    }


def table(rows: list[dict[str, Any]]) -> str:
    base = {r["n"]: r for r in rows if r["variant"] == "before"}
    lines = ["| n | variant | k | t | client s | x before | server s | x before | unmask s | "
             "up / client (B) | x before | down / client (B) | x before | device cert checks s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base[r["n"]]
        client, server = r["client_seconds_mean"], r["server_seconds_total"]
        lines.append(
            f"| {r['n']} | {r['variant']} | {r['degree']} | {r['threshold']} | "
            f"{client:.3f} | {client / b['client_seconds_mean']:.2f} | "
            f"{server:.2f} | {server / b['server_seconds_total']:.2f} | "
            f"{r['server_unmask_seconds']:.2f} | {r['upload_bytes_per_client']:,.0f} | "
            f"{r['upload_bytes_per_client'] / b['upload_bytes_per_client']:.3f} | "
            f"{r['download_bytes_per_client']:,.0f} | "
            f"{r['download_bytes_per_client'] / b['download_bytes_per_client']:.2f} | "
            f"{r['device_certificate_seconds']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n = 10, 20 at 2,000 coordinates")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "secagg_active.json")
    args = ap.parse_args(argv)
    sizes, length = ((10, 20), 2_000) if args.quick else ((20, 100, 300, 1000), 100_000)
    rows = []
    for n in sizes:
        pki = build_identities(list(range(1, n + 1)))
        for variant in VARIANTS:
            rows.append(bench(n, length, variant, pki))
            print(f"n={n} {variant}: {rows[-1]['wall_seconds']:.1f} s", flush=True)
    doc = {"meta": {"quick": args.quick, "python": platform.python_version(),
                    "machine": platform.machine(), "cpus": __import__("os").cpu_count(),
                    "dropout": 0.2, "planner_expected_dropout": 0.2},
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    md = table(rows)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
