"""The memory planner's estimate holds against a real batched pass (peak RSS, Linux)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                 reason="needs Linux's resettable peak RSS (VmHWM)")]

PROBE = r"""
import json, sys
from pathlib import Path
import torch
from fedpeft.client.runtime import ClientIdentity, ClientRuntime
from fedpeft.runconfig.config import parse_run_config
from fedpeft.training.batched import batched_local_train, cohort_plan
from tests.conftest import tiny_flat

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

torch.set_num_threads(2)
clients, rows = int(sys.argv[1]), int(sys.argv[2])
run = parse_run_config(tiny_flat(**{"batch-size": 8, "local-steps": 1, "max-length": 32,
                                     "optimizer": "sgd", "max-examples-per-client": 16}))
rts = [ClientRuntime(run, ClientIdentity(f"c{i}", i, clients)) for i in range(clients)]
model = rts[0].model
datas = [rt.data() for rt in rts]
start = model.adapter_state()
def once(k, r):
    batched_local_train(model, datas[:k], [start] * k, run.train,
                        generators=[rt.shuffle_generator(1) for rt in rts[:k]], micro_batch=r)
once(1, 1)  # warm-up: every lazy allocation of the code path, at one row
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
once(clients, rows)
peak = status("VmHWM")
plan = cohort_plan(model, datas, run.train, clients=clients, rows=rows, budget_bytes=2**62)
print(json.dumps({"measured": peak - before, "estimate": plan.estimate_bytes,
                  "rows": plan.rows}))
"""


def test_the_estimate_is_conservative_and_not_absurd() -> None:
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", PROBE, "8", "64"], cwd=root, check=True,
                         capture_output=True, text=True, timeout=600)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["rows"] == 64
    # The pass must really have allocated something for the comparison to mean anything.
    assert doc["measured"] > 100 * 2**20, doc
    assert doc["estimate"] >= doc["measured"], doc  # never plans a batch that would not fit
    assert doc["estimate"] <= 6 * doc["measured"], doc  # and does not refuse what would
