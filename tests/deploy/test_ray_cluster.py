"""The simulation over an existing Ray cluster (``ray start --head`` on loopback).

flwr 1.42's Ray backend (``flwr/server/superlink/fleet/vce/backend/raybackend.py``) calls
``ray.init(runtime_env=..., include_dashboard=False, **init_args)`` with no ``address``, so
Ray resolves the cluster itself: ``RAY_ADDRESS`` first. ``fedpeft.simulations.launcher.simulate`` passes
its environment on to the SuperLink, and from there to ``flwr-simulation`` (the Ray driver), so
setting ``RAY_ADDRESS`` is enough; no launcher option is needed.

The cluster is ours alone: its own ``--temp-dir`` (so ``ray_current_cluster`` is not written to
``/tmp/ray``, where other simulations on this machine would auto-attach to it), started with
``--block`` in its own session and stopped by its pid/process group, never ``ray stop`` (which
kills every Ray process of the user on the machine, including other people's simulations).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedpeft.deploy.runner import free_port
from fedpeft.simulations.launcher import simulate
from tests.conftest import tiny_flat

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RAY = str(Path(sys.executable).parent / "ray")
# Ray on Linux replaces --node-ip-address 127.0.0.1 by the host's routable IP
# (ray._private.services.resolve_ip_for_localhost) and listens there. Ray's single-node mode
# (meant for macOS/Windows) keeps every address on the loopback IP instead; no other node can
# join such a cluster, which is what a loopback test wants. Set for ray start, the driver
# (through RAY_ADDRESS's environment) and the queries alike.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

QUERY = """
import json, os, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
me = ray.get_runtime_context().get_job_id()
doc = {"me": me, "pid": os.getpid(),
       "jobs": [{k: j[k] for k in ("JobID", "DriverPid", "IsDead")} for j in state.jobs()],
       "actors": [{k: a[k] for k in ("ActorClassName", "JobID", "State")}
                  for a in state.actors().values()],
       "nodes": [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]}
ray.shutdown()
print("QUERY" + json.dumps(doc))
"""


@dataclass
class RayCluster:
    proc: subprocess.Popen[bytes]
    address: str
    temp_dir: Path
    log: Path

    def descendants(self) -> dict[int, str]:
        """Every process below the ``ray start --block`` process: pid -> start time (so that
        a pid reused by another process is never mistaken for one of ours)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
        out: dict[int, str] = {}
        todo = [self.proc.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                fields = _stat(child)
                if child not in out and fields is not None:
                    out[child] = fields[19]
                    todo.append(child)
        return out

    def stop(self) -> dict[int, str]:
        """SIGTERM the cluster's process group (``--block`` shuts its processes down), then
        SIGKILL whatever it left, by pid. Returns the pids the cluster had."""
        started = self.descendants()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers left in the group
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 15
        for pid, start in sorted(started.items()):
            while _alive(pid, start) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)
        return started


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ..., starttime at 19]."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _alive(pid: int, start: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[19] == start and fields[0] != "Z"


def _ray_env() -> dict[str, str]:
    env = os.environ.copy()
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(LOOPBACK_ONLY)
    return env


@pytest.fixture
def cluster() -> Iterator[RayCluster]:
    # a short absolute path: Ray's unix socket paths must stay under ~107 characters
    temp_dir = Path(tempfile.mkdtemp(prefix="fpray-", dir="/tmp"))
    port = free_port()
    log = temp_dir / "ray-start.log"
    cmd = [RAY, "start", "--head", "--port", str(port), "--num-cpus", "2",
           "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
           "--include-dashboard=false", "--temp-dir", str(temp_dir), "--block"]
    with open(log, "ab") as sink:
        proc = subprocess.Popen(cmd, env=_ray_env(), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    ray = RayCluster(proc=proc, address=f"127.0.0.1:{port}", temp_dir=temp_dir, log=log)
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            status = subprocess.run([RAY, "status", "--address", ray.address], env=_ray_env(),
                                    capture_output=True, text=True, timeout=60, check=False)
            if status.returncode == 0 and "2.0 CPU" in status.stdout:
                break
            assert time.monotonic() < deadline, (status.stdout, status.stderr,
                                                 log.read_text()[-3000:])
            time.sleep(1)
        yield ray
    finally:
        started = ray.stop()
    assert proc.poll() is not None
    assert started, "the cluster had no processes (gcs_server, raylet, ...)"
    time.sleep(1)
    assert not any(_alive(p, t) for p, t in started.items())
    shutil.rmtree(temp_dir, ignore_errors=True)


def _query(address: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", QUERY, address], env=_ray_env(),
                         capture_output=True, text=True, timeout=120, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("QUERY")), None)
    assert out.returncode == 0 and line is not None, (out.stdout[-2000:], out.stderr[-2000:])
    doc: dict[str, Any] = json.loads(line[len("QUERY"):])
    return doc


def test_simulation_runs_on_an_existing_ray_cluster(cluster: RayCluster, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    before = _query(cluster.address)
    assert before["actors"] == []
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    for key, value in LOOPBACK_ONLY.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    result = simulate(tiny_flat(**{"num-rounds": 1}), 2, run_dir,  # type: ignore[arg-type]
                      stream=False, timeout=400)
    assert result.status == "finished:completed", (
        result.status, (run_dir / "flwr-run.log").read_text()[-3000:])
    assert (run_dir / "checkpoints" / "round-0001" / "adapter").is_dir()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["ok"] == 2

    # the job ran on *this* cluster: its driver (flwr-simulation) registered a job here and
    # the virtual clients ran as ClientAppActor actors of that job
    after = _query(cluster.address)
    assert after["nodes"] == ["127.0.0.1"]
    jobs = [j for j in after["jobs"] if j["JobID"] not in (before["me"], after["me"])]
    actors = [a for a in after["actors"] if a["ActorClassName"] == "ClientAppActor"]
    assert len(jobs) == 1 and jobs[0]["IsDead"], jobs  # the simulation's driver, finished
    assert actors and {a["JobID"] for a in actors} == {jobs[0]["JobID"]}, actors
    assert all(a["State"] == "DEAD" for a in actors)
    # with 2 CPUs in the cluster and 2 CPUs per client, one actor served both clients
    assert len(actors) == 1
