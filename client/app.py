"""Flower ``ClientApp`` adapter (Message API): converts messages to flat dicts and back.

All work happens in :class:`fedpeft.client.runtime.ClientRuntime`. Runtimes are kept per process and
per node, so the frozen base model (shared through ``fedpeft.peft_methods.get_adapted``) and each
client's tokenised data are loaded once, not per round.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.client.node_identity import client_id_of, load_node_identity
from fedpeft.client.runtime import ClientIdentity, ClientRuntime
from fedpeft.core.protocol import KIND_SECAGG, KIND_TRAIN, RECORD
from fedpeft.runconfig.config import RunConfig, parse_run_config

STATE = "fedpeft-state"
app = ClientApp()
_RUNTIMES: dict[tuple[tuple[object, ...], str, int, int], ClientRuntime] = {}


def identity_from_node_config(node_config: dict[str, object]) -> ClientIdentity:
    """Simulation gives ``partition-id``/``num-partitions``; deployments add ``client-id``."""
    partition_id = int(node_config.get("partition-id", 0))  # type: ignore[call-overload]
    num_partitions = int(node_config.get("num-partitions", 1))  # type: ignore[call-overload]
    client_id = client_id_of(node_config)
    state_dir = str(node_config.get("state-dir", ""))
    budget = float(node_config.get("epsilon-budget", 0.0))  # type: ignore[arg-type]
    return ClientIdentity(client_id=client_id, partition_id=partition_id,
                          num_partitions=num_partitions, state_dir=state_dir,
                          epsilon_budget=budget)


def runtime_for(context: Context) -> ClientRuntime:
    # secagg-ca / secagg-sim-identities name files of the coordinator's machine: not checked
    # here (a deployment node pins its own CA, node config secagg-ca)
    run: RunConfig = parse_run_config(dict(context.run_config), local_files=False)
    node_config: dict[str, object] = dict(context.node_config)
    identity = identity_from_node_config(node_config)
    key = (run.flat, identity.client_id, identity.partition_id, identity.num_partitions)
    rt = _RUNTIMES.get(key)
    if rt is None:
        rt = ClientRuntime(run, identity, load_node_identity(node_config, run))
        _RUNTIMES[key] = rt
    return rt


def _handle(kind: str, msg: Message, context: Context) -> Message:
    content = dict(msg.content[RECORD])
    # Per-node state (secure-aggregation secrets between stages) lives in context.state, which
    # Flower keeps with the node (SuperNode / simulation backend), never sent to the server.
    stored = context.state.config_records.get(STATE)
    state: dict[str, bytes] = ({k: v for k, v in stored.items() if isinstance(v, bytes)}
                               if stored is not None else {})
    reply = runtime_for(context).handle(kind, content, state)  # type: ignore[arg-type]
    context.state.config_records[STATE] = ConfigRecord(state)  # type: ignore[arg-type]
    return Message(RecordDict({RECORD: ConfigRecord(reply)}), reply_to=msg)  # type: ignore[arg-type]


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(KIND_TRAIN, msg, context)


@app.query(KIND_SECAGG)
def secagg(msg: Message, context: Context) -> Message:
    return _handle(KIND_SECAGG, msg, context)
