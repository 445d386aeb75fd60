"""A long-lived ClientApp executor for ``flower-supernode --isolation process``.

With flwr 1.42 defaults every message to a SuperNode starts a fresh ``flwr-clientapp``
process, which re-imports torch/transformers and reloads the base model: seconds of pure
overhead per round on an edge board. Flower's ``process`` isolation mode lets an external
executor take the ClientApp tasks from the SuperNode's Runtime API instead. This module is
such an executor: one process that

* pre-imports the heavy libraries once (torch, transformers, peft);
* takes each ClientApp task from the SuperNode's Runtime API (``AcquireTask``, the same call
  ``flower-superexec`` makes), and runs it **in this process** with Flower's own task
  functions (``pull_task_input`` -> ``ClientApp`` -> ``push_message`` ->
  ``push_task_output``, as ``flwr-clientapp`` does), so the ClientApp module, the frozen base
  model (``fedpeft.peft_methods.get_adapted``) and each client's tokenised data stay loaded;
* hands a task whose app (FAB hash) differs from the one already loaded to Flower's own
  cold ``flwr-clientapp`` process, so a new app (run config, components) is never run with
  stale state. The code is the fedpeft installed on the node (the FAB carries none).

Flower is imported here (a Flower adapter like ``client/app.py``; ``.importlinter`` allows
exactly these); the deployment runner starts this file, and imports it to find it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

log = logging.getLogger("fedpeft.client.warm_app")

PRELOAD = ("torch", "transformers", "peft", "safetensors")


@dataclass
class WarmState:
    """What stays loaded between tasks."""

    fab_hash: str | None = None
    installed: set[str] = field(default_factory=set)
    tasks: int = 0
    cold_tasks: int = 0
    task_seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class RuntimeEndpoint:
    """How to reach the SuperNode's Runtime API."""

    address: str
    insecure: bool = True
    root_certificates: str | None = None

    def client(self, token: str | None = None) -> RuntimeHttpClient:
        interceptors: list[object] = [RuntimeVersionHttpInterceptor(component_name=(
            "flwr-clientapp" if token else "SuperExec"))]
        if token:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.insecure,
            root_certificates=None if self.insecure else self.root_certificates,
            interceptors=interceptors,  # type: ignore[arg-type]
            retry_invoker=make_simple_http_retry_invoker())


def preload(modules: tuple[str, ...] = PRELOAD) -> float:
    """Import the heavy libraries once; returns the seconds it took."""
    t0 = time.perf_counter()
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            log.warning("preload: %s is not installed; skipped", name)
    return time.perf_counter() - t0


def run_task_in_process(endpoint: RuntimeEndpoint, token: str, state: WarmState) -> bool:
    """Run one ClientApp task here, as ``flwr-clientapp`` would in a fresh process.

    Returns True if the ClientApp completed. Errors become an error reply, as in Flower.
    """
    client = endpoint.client(token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message: Message | None = None
    reply: Message | None = None
    context: Context | None = None
    sub_status = SubStatus.FAILED
    details = "ClientApp task failed due to unknown reason"
    t0 = time.perf_counter()
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        if fab.hash_str not in state.installed:
            install_from_fab(fab.content, skip_prompt=True)
            state.installed.add(fab.hash_str)
        state.fab_hash = state.fab_hash or fab.hash_str
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        app: ClientApp = load(run.fab_id, run.fab_version, fab.hash_str)
        reply = app(message=message, context=context)
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - mirrors flwr-clientapp: every failure -> reply
        code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError)
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
        details = f"{type(ex)}:<'{ex}'>"
        log.error("ClientApp raised an exception", exc_info=ex)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as ex:  # noqa: BLE001 - reported, the executor keeps serving
            log.error("failed to push the reply: %s", ex)
            sub_status = SubStatus.FAILED
        push_task_output(client=client, context=context, sub_status=sub_status,
                         details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    seconds = time.perf_counter() - t0
    state.tasks += 1
    state.task_seconds.append(seconds)
    log.info("task %d done in %.2fs (%s)", state.tasks, seconds, sub_status)
    return sub_status == SubStatus.COMPLETED


def run_task_cold(endpoint: RuntimeEndpoint, token: str, parent_pid: int | None) -> None:
    """Hand a task to Flower's own ``flwr-clientapp`` process (what ``flower-superexec`` does)."""
    exe = Path(sys.executable).parent / "flwr-clientapp"
    cmd = [str(exe) if exe.exists() else "flwr-clientapp",
           "--runtime-api-address", endpoint.address, "--token", token]
    if endpoint.insecure:
        cmd.append("--insecure")
    elif endpoint.root_certificates:
        cmd += ["--root-certificates", endpoint.root_certificates]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    subprocess.run(cmd, check=False)


class _Stop:
    requested = False


def _request_stop(signum: int, frame: FrameType | None) -> None:
    _Stop.requested = True


def serve(endpoint: RuntimeEndpoint, *, poll_interval: float = 0.2,
          parent_pid: int | None = None, max_tasks: int | None = None) -> WarmState:
    """Take ClientApp tasks from the SuperNode until stopped (SIGTERM/SIGINT, or max_tasks)."""
    if not 0.01 <= poll_interval <= 60:
        raise ValueError(f"poll_interval={poll_interval} must be in [0.01, 60] seconds")
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    log.info("preloaded %s in %.1fs", ", ".join(PRELOAD), preload())
    state = WarmState()
    poller = endpoint.client()
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    try:
        while not _Stop.requested and (max_tasks is None or state.tasks < max_tasks):
            try:
                res = poller.AcquireTask(request)
            except Exception as ex:  # noqa: BLE001 - the SuperNode may be restarting
                log.warning("Runtime API at %s unreachable: %s", endpoint.address, ex)
                time.sleep(max(poll_interval, 1.0))
                continue
            if res.HasField("task") and res.token:
                fab_hash = res.task.fab_hash or None
                if state.fab_hash is not None and fab_hash not in (None, state.fab_hash):
                    log.warning("task for app %s, but app %s is loaded: running it in a cold "
                                "flwr-clientapp; restart `fedpeft client` to warm the new app",
                                fab_hash, state.fab_hash)
                    run_task_cold(endpoint, res.token, parent_pid)
                    state.cold_tasks += 1
                    state.tasks += 1
                else:
                    run_task_in_process(endpoint, res.token, state)
                continue
            time.sleep(poll_interval)
    finally:
        poller.close()
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedpeft.client.warm_app",
        description="Long-lived ClientApp executor for flower-supernode --isolation process")
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API, host:port (its --host/--port)")
    parser.add_argument("--insecure", action="store_true",
                        help="the Runtime API is plain HTTP (loopback only)")
    parser.add_argument("--root-certificates", help="CA of the Runtime API's TLS certificate")
    parser.add_argument("--parent-pid", type=int, help="exit when this process exits")
    parser.add_argument("--poll-interval", type=float, default=0.2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    if args.insecure == bool(args.root_certificates):
        parser.error("give exactly one of --insecure and --root-certificates")
    endpoint = RuntimeEndpoint(args.runtime_api_address, insecure=args.insecure,
                               root_certificates=args.root_certificates)
    state = serve(endpoint, poll_interval=args.poll_interval, parent_pid=args.parent_pid)
    log.info("stopped after %d tasks (%d cold)", state.tasks, state.cold_tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
