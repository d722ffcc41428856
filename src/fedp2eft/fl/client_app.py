"""Flower ClientApp: runs ``FederatedTask.client_update`` for the client index the server asks for.

Building a task loads a model, so each process keeps the last built task and reuses it while
the (task, config) pair stays the same. Any exception propagates: Flower turns it into an
error reply, which the server counts as a failed client.

Under secure aggregation the training message comes in Flower's legacy format through the SecAgg+ client mod,
and the reply is the client's update, checked and then masked (``secure_aggregation.py``).

A ``StatefulTask``'s client keeps its own state in Flower's ``Context.state`` between rounds and, as the
run's checkpoint on the client side, in files under the node's ``state-dir`` (``core/client_state.py``); the
reply carries only the weights that are averaged.
"""

from __future__ import annotations

import json
import math
import sys
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedp2eft.core.client_state import ClientStateStore
from fedp2eft.core.federation import FederatedTask
from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl import protocol as P
from fedp2eft.fl.secure_aggregation import decode_instructions, encode_update, is_secure, secure_aggregation_mod
from fedp2eft.fl.tasks import build_task
from fedp2eft.fl.weights import Weights, from_record, to_record
from fedp2eft.interrupt import ignore_interrupts
from fedp2eft.logs import quiet_third_party

app = ClientApp(mods=[secure_aggregation_mod])

_cached: tuple[tuple[str, str], FederatedTask] | None = None


def cached_task(name: str, config_json: str) -> tuple[FederatedTask, bool]:
    """The task for (name, config), built at most once per process while it stays in use; and whether it was
    already built (the reply reports it as ``task-reused``, so a deployment shows whether its ClientApp process
    outlives a message or loads the model again every round)."""
    global _cached
    key = (name, config_json)
    reused = _cached is not None and _cached[0] == key
    if not reused:
        _cached = None  # free the old model before building the new one
        quiet_third_party()
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # a simulated client: a Ray actor
            ignore_interrupts()  # the simulation's process stops the actors on Ctrl-C (interrupt.py)
        _cached = (key, build_task(name, json.loads(config_json)))
    return _cached[1], reused


def partition_id(context: Context) -> int:
    value = context.node_config.get(P.PARTITION_ID)
    if value is None:
        raise FedP2EFTError(
            "this SuperNode has no partition-id; start it with --node-config 'partition-id=<i> num-partitions=<n>'"
        )
    return int(value)


@app.query("partition")
def report_partition(msg: Message, context: Context) -> Message:
    """Tell the server which FederatedTask client this node serves."""
    return Message(RecordDict({P.CONFIG: ConfigRecord({P.PARTITION_ID: partition_id(context)})}), reply_to=msg)


def addressed_task(config: ConfigRecord, context: Context) -> tuple[FederatedTask, bool, int]:
    """The task a message's config names, whether this process had built it already, and the client index the
    message is for (which must be this node's partition)."""
    client_index = int(config[P.CLIENT_INDEX])
    if client_index != partition_id(context):
        raise FedP2EFTError(f"message for client {client_index} reached node of partition {partition_id(context)}")
    return *cached_task(str(config[P.TASK]), str(config[P.TASK_CONFIG])), client_index


@app.query("statistics")
def report_statistics(msg: Message, context: Context) -> Message:
    """This client's terms of the sums a task starts from (``StatisticsTask``), once before round 1."""
    task, _, client_index = addressed_task(msg.content.config_records[P.CONFIG], context)
    return Message(RecordDict({P.STATISTICS: to_record(task.client_statistics(client_index))}), reply_to=msg)


def state_store(context: Context, config: ConfigRecord, client_index: int) -> ClientStateStore:
    """The node's own ``state-dir`` if it has one, else the folder the job names (simulation: the run folder's
    ``clients``, standing in for each virtual node's disk)."""
    root = context.node_config.get(P.NODE_STATE_DIR) or config.get(P.STATE_DIR, "")
    if not root:
        raise FedP2EFTError(
            f"task {config[P.TASK]} keeps client state between rounds, and this SuperNode has no folder for it; "
            "start it with --node-config 'partition-id=<i> num-partitions=<n> state-dir=<folder>'")
    return ClientStateStore(str(root), client_index)


def previous_state(context: Context, store: ClientStateStore, client_index: int, state_round: int) -> Weights | None:
    """This client's state after ``state_round`` (its last accepted round): from ``Context.state`` while the
    node still holds it, else from its file (after a restart, or when a newer update was refused)."""
    if state_round == 0:
        return None
    held = context.state.config_records.get(P.CLIENT_STATE_ROUND)
    if held is not None and (int(held["round"]), int(held["client"])) == (state_round, client_index):
        return from_record(context.state.array_records[P.CLIENT_STATE])
    return store.load(state_round)


def keep_state(context: Context, store: ClientStateStore, client_index: int, server_round: int, state_round: int,
               state: Weights) -> None:
    store.save(server_round, state)
    store.prune(keep_from=state_round)
    context.state[P.CLIENT_STATE] = to_record(state)
    context.state[P.CLIENT_STATE_ROUND] = ConfigRecord({"round": server_round, "client": client_index})


@app.train()
def train(msg: Message, context: Context) -> Message:
    secure = is_secure(msg.content)
    if secure:
        weights, config = decode_instructions(msg.content)
    else:
        weights, config = from_record(msg.content.array_records[P.WEIGHTS]), msg.content.config_records[P.CONFIG]
    task, reused, client_index = addressed_task(config, context)
    server_round = int(config[P.SERVER_ROUND])
    start = time.perf_counter()
    if getattr(task, "keeps_client_state", False):
        store, state_round = state_store(context, config, client_index), int(config[P.STATE_ROUND])
        update = task.client_update(weights, client_index, server_round,
                                    previous_state(context, store, client_index, state_round))
        if update.state is None:
            raise FedP2EFTError(f"task {config[P.TASK]} keeps client state but returned none")
        keep_state(context, store, client_index, server_round, state_round, update.state)
    else:
        update = task.client_update(weights, client_index, server_round)
    elapsed = time.perf_counter() - start
    metrics = {k: float(v) for k, v in update.metrics.items() if math.isfinite(float(v))}
    metrics[P.NUM_EXAMPLES] = int(update.num_examples)
    metrics[P.CLIENT_TIME] = elapsed
    metrics[P.TASK_REUSED] = float(reused)
    if secure:
        return Message(encode_update(weights, update.weights, update.num_examples, metrics, config), reply_to=msg)
    content = RecordDict({P.WEIGHTS: to_record(update.weights), P.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=msg)
