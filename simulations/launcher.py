"""Run a simulated federation on Flower's simulation engine (Ray backend), offline.

The SuperLink (``--simulation``, insecure, on a free loopback port), the ``flwr run``
submission and the final status come from the shared handle
:class:`fedpeft.launch.superlink.SuperLink` (its docstring lists the flwr 1.42 pitfalls it
handles). Here: the simulation's own settings (virtual clients and CPUs per client through
``--federation-config``, ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0``) and the run config,
validated before anything starts. ``FLWR_HOME`` is ``<run_dir>/.flwr``; telemetry is off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedpeft.core.errors import ConfigError, FedPeftError
from fedpeft.core.protocol import Scalar
from fedpeft.launch import superlink
from fedpeft.launch.process import free_port
from fedpeft.launch.superlink import SuperLink, superlink_command
from fedpeft.runconfig.config import DEFAULTS, parse_run_config

CONNECTION = "fedpeft-sim"
SIMULATION_ENV: dict[str, str] = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


class SimulationError(FedPeftError):
    """The simulation could not start, or its run did not complete."""


@dataclass(frozen=True)
class SimulationResult:
    """One simulated run: its id, final status, directory, and exit code (0 = completed)."""

    run_id: str
    status: str
    run_dir: Path
    returncode: int


def project_root() -> Path:
    """The directory holding the Flower app's ``pyproject.toml`` (this source tree)."""
    return superlink.project_root(error=SimulationError)


def run_status(flwr_home: Path, run_id: str) -> str:
    """Final status of a run as the SuperLink reports it (e.g. ``finished:completed``)."""
    return superlink.run_status(flwr_home, CONNECTION, run_id, extra_env=SIMULATION_ENV,
                                error=SimulationError)


def simulate(config: dict[str, Scalar], num_clients: int, run_dir: Path, *,
             num_cpus_per_client: int = 2, timeout: float = 6 * 3600,
             stream: bool = True) -> SimulationResult:
    """Run one simulated federation of ``num_clients`` virtual clients and wait for it."""
    if num_clients < 1:
        raise ConfigError(f"clients={num_clients} must be >= 1")
    run_dir = run_dir.resolve()
    flat = {**DEFAULTS, **config, "run-dir": str(run_dir)}
    run = parse_run_config(flat)  # fail fast, before anything starts
    if run.federation.min_clients > num_clients:
        raise ConfigError(f"min-clients={run.federation.min_clients} exceeds clients={num_clients}")
    if run.cohort.clients > 1:
        raise ConfigError(
            f"batch-clients={run.cohort.clients}: batched training of several virtual clients runs "
            "in-process only (fedpeft simulate --in-process); Flower's simulation engine trains one "
            "ClientApp message at a time. Add --in-process or set batch-clients = 1")
    port = free_port()
    link = SuperLink.start(superlink_command("127.0.0.1", port, simulation=True),
                           run_dir=run_dir, address=f"127.0.0.1:{port}", connection=CONNECTION,
                           extra_env=SIMULATION_ENV, error=SimulationError)
    try:
        nodes = num_clients + run.user_dp.canaries  # the user-level audit's canary clients
        done = link.run(flat, stream=stream, timeout=timeout, federation_config=(
            f"num_supernodes={nodes} client_resources_num_cpus={num_cpus_per_client}"))
    finally:
        link.stop()
    return SimulationResult(run_id=done.run_id, status=done.status, run_dir=run_dir,
                            returncode=0 if done.completed else 1)
