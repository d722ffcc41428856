"""Flower ServerApp: sample clients, ship global weights, aggregate the valid replies with a Flower strategy
(``aggregation.py``; FedAvg by default), checkpoint.

The loop is engine-agnostic (``serve`` only needs a ``Grid``), so simulation and deployment
run the same code. Client index i of the ``FederatedTask`` lives on the node whose
node_config says ``partition-id=i``; the server asks every node once at start-up. What a round's replies come
to (vetting, failures, bytes, the metrics row) is ``round_outcome.py``.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedp2eft.core.federation import FederatedTask
from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl import protocol as P
from fedp2eft.fl.aggregation import TaskStrategy, aggregate, make_strategy, strip_to_aggregate, weights_for
from fedp2eft.fl.checkpoint import RunState, check_resumable, checkpoint_name, is_new_best, last_accepted_round, \
    load_state, load_weights, save_best, save_round
from fedp2eft.fl.job import Job
from fedp2eft.fl.privacy import epsilon_spent
from fedp2eft.fl.report import RoundReporter
from fedp2eft.fl.round_outcome import CLIENT_ERRORS_FILE, RoundOutcome, collect, failure_summary, keep_details, \
    payload_bytes, round_metrics, traffic
from fedp2eft.fl.secure_aggregation import secure_round
from fedp2eft.fl.tasks import build_task
from fedp2eft.fl.weights import Weights, from_record, to_record, update_problem

logger = logging.getLogger(__name__)

NODE_POLL_S = 0.5
NODE_SETTLE_S = 1.0  # no new node for this long after the first round's worth: the rest are not coming now
DISCOVERY_POLL_S = 0.2  # how often discovery pulls the nodes' answers

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the job comes from run_config ``job``."""
    serve(grid, Job.from_run_config(dict(context.run_config)))


def sample_clients(available: list[int], k: int, seed: int, server_round: int, secret: bool = False) -> list[int]:
    """``k`` of ``available``, uniformly without replacement. Deterministic in (seed, round, available), so a
    resumed run samples exactly the same clients; with ``secret`` (a DP run) drawn from the operating system's
    randomness instead, since privacy amplification by sampling holds only for a sample nobody can recompute from
    the run's public seed (docs/federation.md, "Differential privacy")."""
    size = min(k, len(available))
    if secret:
        return sorted(secrets.SystemRandom().sample(available, size))
    picks = np.random.default_rng([seed, server_round]).choice(len(available), size=size, replace=False)
    return sorted(available[int(i)] for i in picks)


def connected_nodes(grid: Grid, wanted: int, expected: int, deadline: float) -> list[int]:
    """The node ids connected once ``wanted`` have arrived and no more are arriving: nodes keep registering after
    the ServerApp starts (a simulation registers its virtual nodes while the ServerApp already runs), so stopping
    at the first ``wanted`` would leave the rest out of every round's sample (seen at 10,000 simulated clients:
    only the first ~2,600 were ever sampled, ``benchmarks/fl_scale.py``). Waits while the count grows, at most
    until ``expected`` are connected or ``deadline`` passes."""
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < wanted and time.monotonic() < deadline:
        time.sleep(NODE_POLL_S)
        node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(NODE_SETTLE_S)
        latest = list(grid.get_node_ids())
        if len(latest) == len(node_ids):
            break
        node_ids = latest
    return node_ids


def discover_clients(grid: Grid, job: Job, num_clients: int, every: bool = False) -> dict[int, int]:
    """Map client index -> node id by asking every connected node for its partition-id; waits (up to the startup
    timeout) for a round's worth of nodes, or with ``every`` for all ``num_clients``, and then for as long as more
    keep arriving (``connected_nodes``). Stops waiting for answers once every client index is claimed: a node the
    link still lists but that is gone (killed, its heartbeat not yet expired) must not hold the run until the
    startup timeout."""
    wanted = num_clients if every else min(job.clients_per_round, num_clients)
    deadline = time.monotonic() + job.startup_timeout_s
    node_ids = connected_nodes(grid, wanted, num_clients, deadline)
    queries = [
        Message(RecordDict({}), dst_node_id=node_id, message_type=P.PARTITION_QUERY, group_id="discovery")
        for node_id in node_ids
    ]
    pending = set(grid.push_messages(queries))
    answers_until = max(deadline, time.monotonic() + 1.0)  # the nodes found get a second to answer, at least
    clients: dict[int, int] = {}
    while True:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            claim_partition(reply, clients, num_clients)
        if not pending or len(clients) == num_clients or time.monotonic() >= answers_until:
            break
        time.sleep(DISCOVERY_POLL_S)
    if len(clients) < job.min_clients:
        raise FedP2EFTError(
            f"only {len(clients)} usable nodes answered within startup_timeout_s={job.startup_timeout_s}, fewer than "
            f"min_clients={job.min_clients}; start more SuperNodes (each with its own partition-id)"
        )
    return clients


def claim_partition(reply: Message, clients: dict[int, int], num_clients: int) -> None:
    """Record the client index a node's answer claims in ``clients`` (index -> node id); a node that cannot serve,
    or names an index outside the task's, is logged and left out; two nodes claiming one index is an error."""
    node_id = reply.metadata.src_node_id
    if reply.has_error():
        logger.warning("node %s cannot serve a client: %s", node_id, reply.error.reason)
        return
    index = int(reply.content.config_records[P.CONFIG][P.PARTITION_ID])
    if not 0 <= index < num_clients:
        logger.warning("node %s has partition-id %d outside the task's 0..%d; ignored", node_id, index,
                       num_clients - 1)
    elif index in clients:
        raise FedP2EFTError(f"nodes {clients[index]} and {node_id} both claim partition-id {index}; "
                            "give every SuperNode a distinct partition-id")
    else:
        clients[index] = node_id


def gather_statistics(grid: Grid, job: Job, clients: dict[int, int]) -> Weights:
    """Element-wise sums of every client's ``client_statistics`` (``StatisticsTask``), asked once before round 1.
    Every client must answer: a sum over some of them would silently describe another federation."""
    task_config = json.dumps(job.task_config, sort_keys=True)
    messages = [Message(RecordDict({P.CONFIG: ConfigRecord({P.TASK: job.task, P.TASK_CONFIG: task_config,
                                                            P.CLIENT_INDEX: client})}),
                        dst_node_id=node, message_type=P.STATISTICS_QUERY, group_id="statistics")
                for client, node in sorted(clients.items())]
    replies = list(grid.send_and_receive(messages, timeout=job.round_timeout_s))
    failed = [reply.error.reason for reply in replies if reply.has_error()]
    if failed or len(replies) != len(messages):
        raise FedP2EFTError(
            f"feature statistics: {len(messages) - len(replies) + len(failed)} of {len(messages)} clients did not "
            f"answer ({'; '.join(failed[:2]) or 'timeout'}); the task needs every client's statistics before "
            "round 1. Fix the clients and rerun")
    totals: Weights = {}
    for reply in replies:
        for name, tensor in from_record(reply.content.array_records[P.STATISTICS]).items():
            totals[name] = totals[name] + tensor if name in totals else tensor
    return totals


def round_config(job: Job, task_config: str, server_round: int, client: int,
                 history: list[dict[str, Any]]) -> ConfigRecord:
    """What one sampled client is told besides the global weights (``task_config``: the job's, as JSON)."""
    return ConfigRecord({P.TASK: job.task, P.TASK_CONFIG: task_config,
                         P.SERVER_ROUND: server_round, P.CLIENT_INDEX: client,
                         P.STATE_ROUND: last_accepted_round(history, client), P.STATE_DIR: job.client_state_dir})


Exchange = tuple[RoundOutcome, dict[int, int], Callable[[], Weights]]


def plain_exchange(grid: Grid, job: Job, strategy: Strategy, weights: Weights, server_round: int,
                   nodes: dict[int, int], configs: dict[int, ConfigRecord]) -> Exchange:
    """Send each client the global weights (or its share of them), vet every reply, and aggregate the vetted ones
    with the strategy."""
    outgoing = {client: weights_for(strategy, weights, client) for client in configs}
    shared = to_record(weights)
    messages = [Message(RecordDict({P.WEIGHTS: shared if outgoing[client] is weights else to_record(outgoing[client]),
                                    P.CONFIG: config}), dst_node_id=nodes[client],
                        message_type=P.TRAIN, group_id=str(server_round)) for client, config in configs.items()]
    sent = {client: payload_bytes(message.content) for client, message in zip(configs, messages)}
    replies = list(grid.send_and_receive(messages, timeout=job.round_timeout_s))
    outcome = collect(replies, {nodes[c]: c for c in configs}, outgoing, server_round)

    def aggregated() -> Weights:
        for client, reply, num_examples, _ in outcome.updates:
            strip_to_aggregate(reply, num_examples, strategy, client)
        return aggregate(strategy, server_round, weights, [reply for _, reply, _, _ in outcome.updates])

    return outcome, sent, aggregated


def secure_exchange(grid: Grid, job: Job, weights: Weights, server_round: int, nodes: dict[int, int],
                    configs: dict[int, ConfigRecord]) -> Exchange:
    """The round under SecAgg+: the clients vet their own updates (nobody can after masking) and the server gets
    only their weighted average, plus each survivor's example count and metrics."""
    clients = {nodes[c]: c for c in configs}
    result = secure_round(grid, job.secure, server_round, weights, {nodes[c]: config for c, config in configs.items()},
                          job.round_timeout_s)
    outcome = RoundOutcome(received={clients[node]: size for node, size in result.received.items()})
    for node, (num_examples, metrics) in sorted(result.results.items(), key=lambda item: clients[item[0]]):
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        outcome.updates.append((clients[node], None, num_examples, scalars))
    for node, reason in sorted(result.errors.items(), key=lambda item: clients[item[0]]):
        outcome.fail(clients[node], f"client raised: {reason}", server_round)

    def aggregated() -> Weights:
        if result.weights is None:
            raise FedP2EFTError(f"round {server_round}: secure aggregation halted before unmasking (too few clients "
                                f"reached its last stage); the checkpoint of round {server_round - 1} in "
                                f"{job.output_dir} is intact; rerun with resume")
        problem = update_problem(weights, result.weights)
        if problem:
            raise FedP2EFTError(f"round {server_round}: the securely aggregated update is unusable ({problem})")
        return result.weights

    return outcome, {clients[node]: size for node, size in result.sent.items()}, aggregated


def run_round(grid: Grid, job: Job, strategy: Strategy, weights: Weights, server_round: int,
              clients: dict[int, int], history: list[dict[str, Any]]) -> tuple[Weights, dict[str, Any]]:
    start = time.perf_counter()
    sampled = sample_clients(sorted(clients), job.clients_per_round, job.seed, server_round,
                             secret=job.dp is not None)
    task_config = json.dumps(job.task_config, sort_keys=True)
    configs = {client: round_config(job, task_config, server_round, client, history) for client in sampled}
    outcome, sent, aggregated = (
        plain_exchange(grid, job, strategy, weights, server_round, clients, configs) if job.secagg is None
        else secure_exchange(grid, job, weights, server_round, clients, configs))
    keep_details(job.output_path, server_round, outcome.details)
    row = round_metrics(server_round, sampled, outcome, time.perf_counter() - start,
                        traffic(sent, outcome.received, history), private=job.dp is not None)
    needed = len(sampled) if job.dp is not None else job.min_clients
    if len(outcome.updates) < needed:
        rule = ("with DP every sampled client must succeed (the noise is calibrated to the sample)"
                if job.dp is not None else f"min_clients={job.min_clients}")
        raise FedP2EFTError(
            f"round {server_round}: only {len(outcome.updates)} of {len(sampled)} sampled clients succeeded, "
            f"fewer than {rule}; failures: {failure_summary(outcome.failures)} (full reasons in "
            f"{job.output_path / CLIENT_ERRORS_FILE}); the run stopped and "
            f"the checkpoint of round {server_round - 1} in {job.output_dir} is intact; fix the clients and "
            "rerun with resume"
        )
    if job.dp is not None:
        row.update(privacy_row(job, server_round, len(clients)))
    if job.secure is not None:
        shares, threshold = job.secure.shares_and_threshold(len(sampled))
        row.update({"secagg/shares": shares, "secagg/threshold": threshold,
                    "secagg/error_bound": job.secure.error_bound([n for _, _, n, _ in outcome.updates])})
    return aggregated(), row


def privacy_row(job: Job, server_round: int, population: int) -> dict[str, float]:
    """The privacy spent after this round's release (``privacy/epsilon`` at ``privacy/delta``), and its inputs."""
    dp = job.privacy
    sample = min(job.clients_per_round, population)
    return {"privacy/epsilon": epsilon_spent(dp, server_round, population, sample), "privacy/delta": dp.delta,
            "privacy/noise_multiplier": dp.noise_multiplier, "privacy/clipping_norm": dp.clipping_norm,
            "privacy/sampling_rate": sample / population, "privacy/secret_sampling": 1.0}


def serve(grid: Grid, job: Job, task: FederatedTask | None = None) -> Path:
    """Run (or resume) the job to ``job.rounds``; return the final checkpoint path."""
    out = job.output_path
    state = load_state(out)
    if state is not None and not job.resume:
        raise FedP2EFTError(f"{out} already holds a run at round {state.round}; pass resume to continue it "
                            "or choose an empty output directory")
    task = task if task is not None else build_task(job.task, job.task_config)
    strategy = make_strategy(job.strategy, job.privacy, job.clients_per_round, task)
    if job.secagg is not None and isinstance(strategy, TaskStrategy):
        raise FedP2EFTError(f"task {job.task} combines its clients' updates in its own way (not a sum), which secure "
                            "aggregation cannot compute on masked updates; run it without secagg")
    job_record = asdict(job)
    clients: dict[int, int] | None = None
    if state is None:
        state = RunState(round=0, checkpoint=checkpoint_name(0), job=job_record)
        if getattr(task, "needs_statistics", False):
            clients = discover_clients(grid, job, task.num_clients(), every=True)
            if len(clients) < task.num_clients():
                raise FedP2EFTError(
                    f"the task starts from statistics over all {task.num_clients()} clients, but only {len(clients)} "
                    f"nodes answered within startup_timeout_s={job.startup_timeout_s}; start every SuperNode first")
            weights = task.initial_weights_from(gather_statistics(grid, job, clients))
        else:
            weights = task.initial_weights()
        save_round(out, weights, state)
    else:
        check_resumable(state, job)
        weights = load_weights(out, state)
        logger.info("resuming %s after round %d", out, state.round)
    if state.round >= job.rounds:
        return out / state.checkpoint
    clients = clients or discover_clients(grid, job, task.num_clients())
    reporter = RoundReporter(out, job.rounds, state.round + 1)
    best_metric = getattr(task, "best_metric", None)
    try:
        for server_round in range(state.round + 1, job.rounds + 1):
            incoming = weights
            weights, row = run_round(grid, job, strategy, weights, server_round, clients, state.history)
            state = RunState(round=server_round, checkpoint=checkpoint_name(server_round), job=job_record,
                             history=[*state.history, row])
            if best_metric is not None and is_new_best(state.history, best_metric):
                save_best(out, incoming, server_round - 1)  # the metric was measured on the round's incoming weights
            save_round(out, weights, state)
            reporter.round_done(row)
    finally:
        reporter.close()
    return out / state.checkpoint
