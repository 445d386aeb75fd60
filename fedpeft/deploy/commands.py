"""``fedpeft certs`` / ``fedpeft coordinator`` / ``fedpeft client``: a real Flower deployment.

Register them on the ``fedpeft`` parser with ``add_deploy_parsers(subparsers)``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from fedpeft.core.errors import ConfigError
from fedpeft.core.protocol import Scalar
from fedpeft.deploy.certs import (
    DEFAULT_HOSTS,
    CertLayout,
    SecAggNodeFiles,
    add_nodes,
    init_cert_dir,
    secagg_files_beside,
)
from fedpeft.deploy.errors import DeployError
from fedpeft.deploy.runner import (
    DEFAULT_PORT,
    INSECURE_WARNING,
    full_run_config,
    start_client,
    start_superlink,
    submit_run,
)
from fedpeft.runconfig.overrides import parse_overrides


class _Interrupted(Exception):
    pass


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signum)


def _warn_insecure(where: str) -> None:
    print(INSECURE_WARNING.format(where=where), file=sys.stderr, flush=True)


# -- certs -------------------------------------------------------------------------------------
def cmd_certs_init(args: argparse.Namespace) -> int:
    layout = init_cert_dir(Path(args.dir), hosts=args.host or list(DEFAULT_HOSTS),
                           nodes=args.nodes, names=args.name or (), valid_days=args.days,
                           expired=args.expired, force=args.force)
    print(f"fedpeft: CA {layout.ca_cert}, server certificate {layout.server_cert} for "
          f"{', '.join(args.host or DEFAULT_HOSTS)}; {args.nodes} node key(s) and SecAgg "
          f"identities in {layout.root / 'nodes'}; allow-list {layout.allow_list}")
    if args.expired:
        print("fedpeft: the server certificate is EXPIRED on purpose (--expired)",
              file=sys.stderr)
    print("Give each client ca.crt, its own nodes/<name>.key and nodes/secagg-<name>.key/.crt; "
          "give the coordinator ca.crt, server.crt, server.key and supernodes.allow; keep "
          "ca.key with you, off the coordinator (it certifies SecAgg nodes; `certs add-node` "
          "runs where it is).")
    return 0


def cmd_certs_add_node(args: argparse.Namespace) -> int:
    written = add_nodes(Path(args.dir), args.name, force=args.force, valid_days=args.days)
    print("fedpeft: wrote " + ", ".join(str(p) for p in written) + f"; appended to "
          f"{CertLayout(Path(args.dir)).allow_list} (restart the coordinator to register)")
    return 0


# -- coordinator -------------------------------------------------------------------------------
def _coordinator_config(args: argparse.Namespace, run_dir: Path,
                        certs: Path | None = None) -> dict[str, Scalar]:
    """The run config. With ``certs`` (TLS) and secagg on, SecAgg+ rounds are authenticated
    by the same CA, ``certs/ca.crt``, unless ``secagg-ca`` or ``secagg-sim-identities`` is
    set (``--set secagg-ca=`` runs unauthenticated rounds, for nodes enrolled before
    ``fedpeft certs`` issued SecAgg identities)."""
    overrides: dict[str, Scalar] = {}
    if args.preset:
        from fedpeft.runconfig.presets import get_preset

        preset = get_preset(args.preset)
        overrides.update(preset.config)
        overrides["preset"] = preset.name
    if args.rounds is not None:
        overrides["num-rounds"] = args.rounds
    overrides.update(parse_overrides(args.set or []))
    config = full_run_config(overrides, run_dir)
    ca = certs / "ca.crt" if certs is not None else None
    if (ca is not None and ca.is_file() and config["secagg"] and "secagg-ca" not in overrides
            and "secagg-sim-identities" not in overrides):
        overrides["secagg-ca"] = str(ca.resolve())
        config = full_run_config(overrides, run_dir)
    return config


def cmd_coordinator(args: argparse.Namespace) -> int:
    if args.insecure:
        _warn_insecure(f"{args.host}:{args.port}")
        certs = None
    else:
        if not args.certs:
            raise ConfigError("--certs DIR is required (create it with `fedpeft certs init "
                              "DIR`); plain HTTP only with --insecure")
        certs = Path(args.certs)
    run_dir = Path(args.run_dir or f"runs/deploy-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    config = _coordinator_config(args, run_dir, certs)  # validated before anything starts
    if config["secagg-ca"]:
        print(f"fedpeft: authenticated SecAgg+ rounds (secagg-ca={config['secagg-ca']}): each "
              "client needs its nodes/secagg-<name>.key/.crt beside its --node-key (`fedpeft "
              "certs add-node` issues them); --set secagg-ca= runs unauthenticated rounds",
              flush=True)
    wait_nodes = args.wait_nodes if args.wait_nodes is not None else int(config["min-clients"])
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    link = start_superlink(certs, run_dir, host=args.host, port=args.port)
    try:
        print(f"fedpeft: SuperLink on {link.address} ({'TLS + SuperNode auth' if certs else 'INSECURE'}"
              f"); FLWR_HOME={link.flwr_home}; log {link.log_file}", flush=True)
        if args.serve:
            print(f"fedpeft: serving; submit runs with `FLWR_HOME={link.flwr_home} flwr run . "
                  "fedpeft-deploy --stream`; Ctrl-C stops", flush=True)
            while link.proc.poll() is None:
                time.sleep(1)
            raise DeployError(f"flower-superlink exited ({link.proc.returncode}); see "
                              f"{link.log_file}")
        print(f"fedpeft: waiting for {wait_nodes} SuperNode(s) ...", flush=True)
        link.wait_for_nodes(wait_nodes, args.wait_timeout)
        result = submit_run(link, config, stream=not args.quiet)
        print(f"\nrun {result.run_id}: {result.status}; outputs in {result.run_dir}")
        return 0 if result.ok else 1
    except (_Interrupted, KeyboardInterrupt):
        print("fedpeft: stopping", file=sys.stderr)
        return 130
    finally:
        link.stop()
        signal.signal(signal.SIGTERM, previous)


# -- client ------------------------------------------------------------------------------------
def _ca_cert(certs: str) -> Path:
    path = Path(certs)
    return path / "ca.crt" if path.is_dir() else path


def cmd_client(args: argparse.Namespace) -> int:
    if args.insecure:
        _warn_insecure(args.superlink)
        ca_cert = node_key = None
    else:
        if not args.certs or not args.node_key:
            raise ConfigError("--certs (the federation's ca.crt or its directory) and "
                              "--node-key (this client's nodes/<name>.key) are required; "
                              "plain HTTP only with --insecure")
        ca_cert, node_key = _ca_cert(args.certs), Path(args.node_key)
    # the node's SecAgg identity, beside its SuperNode key (nodes/secagg-<name>.key, .crt)
    secagg: SecAggNodeFiles | None = (
        secagg_files_beside(node_key, ca_cert) if node_key is not None and ca_cert is not None
        else None)
    if secagg is not None:
        print(f"fedpeft: SecAgg identity {secagg.cert}: this client joins only rounds "
              f"authenticated by {secagg.ca}", flush=True)
    state_dir = Path(args.state_dir or f"client-state/{args.client_id}")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    node = start_client(superlink=args.superlink, client_id=args.client_id,
                        partition_id=args.partition_id, num_partitions=args.num_partitions,
                        state_dir=state_dir, ca_cert=ca_cert, node_key=node_key,
                        warm=not args.cold, max_wait_time=args.max_wait_time,
                        to_files=not args.foreground_logs, secagg=secagg)
    print(f"fedpeft: client {args.client_id} -> {args.superlink} "
          f"({'warm ClientApp' if node.worker else 'one ClientApp process per message'}); "
          f"logs in {node.state_dir}", flush=True)
    try:
        code = node.supernode.wait()
        if code != 0:
            tail = node.log_text()[-1500:]
            print(f"fedpeft: flower-supernode exited with code {code}\n{tail}", file=sys.stderr)
        return 0 if code == 0 else 1
    except (_Interrupted, KeyboardInterrupt):
        return 130
    finally:
        node.stop()
        signal.signal(signal.SIGTERM, previous)


# -- parser wiring -----------------------------------------------------------------------------
def add_deploy_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``certs``, ``coordinator`` and ``client`` on the ``fedpeft`` subparsers."""
    certs = sub.add_parser("certs", help="TLS certificates, SuperNode keys and SecAgg node "
                           "identities")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    init = csub.add_parser("init", help="create a CA, a server certificate, node keys and "
                           "each node's SecAgg identity (nodes/secagg-<name>.key/.crt)")
    init.add_argument("dir")
    init.add_argument("--host", action="append", metavar="NAME_OR_IP",
                      help="a name/IP clients use to reach the coordinator (repeat; default "
                      "localhost and 127.0.0.1)")
    init.add_argument("--nodes", type=int, default=2, help="node key pairs to create")
    init.add_argument("--name", action="append", help="node names (repeat; default node-1..N)")
    init.add_argument("--days", type=int, default=365,
                      help="validity of the server and SecAgg node certificates")
    init.add_argument("--expired", action="store_true", help=argparse.SUPPRESS)  # tests
    init.add_argument("--force", action="store_true", help="replace existing keys and certs")
    init.set_defaults(func=cmd_certs_init)
    add = csub.add_parser("add-node", help="add node key pairs and SecAgg identities to an "
                          "existing directory (needs its ca.key: run it where the CA key is)")
    add.add_argument("dir")
    add.add_argument("--name", action="append", required=True)
    add.add_argument("--days", type=int, default=365, help="SecAgg node certificate validity")
    add.add_argument("--force", action="store_true")
    add.set_defaults(func=cmd_certs_add_node)

    co = sub.add_parser("coordinator", help="run a SuperLink (TLS + node auth) and one run")
    co.add_argument("--certs", help="directory made by `fedpeft certs init`")
    co.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for LAN)")
    co.add_argument("--port", type=int, default=DEFAULT_PORT)
    co.add_argument("--run-dir")
    co.add_argument("--preset")
    co.add_argument("--rounds", type=int)
    co.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="any run config key (see pyproject.toml [tool.flwr.app.config])")
    co.add_argument("--wait-nodes", type=int, help="SuperNodes to wait for (default min-clients)")
    co.add_argument("--wait-timeout", type=float, default=600.0)
    co.add_argument("--serve", action="store_true",
                    help="only run the SuperLink (submit runs yourself with `flwr run`)")
    co.add_argument("--quiet", action="store_true", help="do not stream the run's log")
    co.add_argument("--insecure", action="store_true",
                    help="NO TLS and NO node authentication (trusted lab networks only)")
    co.set_defaults(func=cmd_coordinator)

    cl = sub.add_parser("client", help="run a SuperNode that trains for the federation")
    cl.add_argument("--certs", help="the federation's ca.crt (or the directory holding it)")
    cl.add_argument("--node-key", help="this client's private key (nodes/<name>.key); its "
                    "SecAgg identity nodes/secagg-<name>.key/.crt beside it, when present, "
                    "makes it join only authenticated SecAgg rounds")
    cl.add_argument("--superlink", required=True, metavar="HOST:PORT")
    cl.add_argument("--client-id", required=True)
    cl.add_argument("--partition-id", type=int, required=True)
    cl.add_argument("--num-partitions", type=int, required=True)
    cl.add_argument("--state-dir")
    cl.add_argument("--max-wait-time", type=float,
                    help="give up connecting to the SuperLink after this many seconds")
    cl.add_argument("--cold", action="store_true",
                    help="Flower's default: a new ClientApp process per message (slower)")
    cl.add_argument("--foreground-logs", action="store_true",
                    help="log to this terminal instead of files in the state dir")
    cl.add_argument("--insecure", action="store_true",
                    help="NO TLS and NO node authentication (trusted lab networks only)")
    cl.set_defaults(func=cmd_client)
