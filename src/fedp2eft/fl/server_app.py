"""Flower ServerApp: sample clients, ship global weights, aggregate the valid replies with a Flower strategy
(``aggregation.py``; FedAvg by default), checkpoint.

The loop is engine-agnostic (``serve`` only needs a ``Grid``), so simulation and deployment
run the same code. Client index i of the ``FederatedTask`` lives on the node whose
node_config says ``partition-id=i``; the server asks every node once at start-up.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
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
from fedp2eft.fl.secure_aggregation import secure_round
from fedp2eft.fl.tasks import build_task
from fedp2eft.fl.weights import Weights, from_record, to_record, update_norm, update_problem

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


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the tensors a message carries: ``ArrayRecord.count_bytes()`` of its array records, i.e. each
    tensor serialized as a NumPy ``.npy`` blob (header + raw data) plus its name. Config and metric records
    (under 1 kB), message metadata, Flower's object framing, gRPC/HTTP-2 framing and TLS are left out:
    the number is the model traffic, a lower bound of what crosses the wire."""
    return sum(record.count_bytes() for record in content.array_records.values())


@dataclass
class RoundOutcome:
    """The replies of one round, split into usable updates (client, reply holding only what is aggregated or
    None under secure aggregation, where the server never holds one, example count, client metrics) and logged
    failures, plus the bytes each client's replies carried (every reply that arrived counts, a refused one too:
    its bytes were moved all the same)."""

    updates: list[tuple[int, Message | None, int, dict[str, float]]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    received: dict[int, int] = field(default_factory=dict)
    details: dict[int, str] = field(default_factory=dict)  # a failed client's full reason (a remote traceback)
    update_norms: dict[int, float] = field(default_factory=dict)  # |weights - what it was sent| per usable update

    def fail(self, client: int, reason: str, server_round: int) -> None:
        short = one_line(reason)
        logger.warning("round %d: client %d left out: %s", server_round, client, short)
        self.failures.append({"client": client, "reason": short})
        self.details[client] = reason


CLIENT_ERRORS_FILE = "client_errors.log"
_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): \S.*)$")


def one_line(reason: str, limit: int = 300) -> str:
    """A failure reason in one line: the first exception line with a message in a (remote) traceback, the root
    cause when exceptions were chained (Ray and Flower wrap a client's exception twice), else the reason's first
    line, cut to ``limit`` characters. The full text goes to the run's ``client_errors.log``."""
    lines = [line for line in reason.strip().splitlines() if line.strip()] or [""]
    exceptions = [m.group(1) for line in lines if (m := _EXCEPTION_LINE.match(line))]
    text = " ".join((exceptions[0] if exceptions else lines[0]).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def keep_details(output_dir: Path, server_round: int, details: dict[int, str]) -> None:
    """Append the round's full failure reasons to ``client_errors.log``, where the terminal's one-liners point."""
    if details:
        with open(output_dir / CLIENT_ERRORS_FILE, "a", encoding="utf-8") as log:
            for client, reason in sorted(details.items()):
                log.write(f"=== round {server_round}, client {client}\n{reason.rstrip()}\n")


def failure_summary(failures: list[dict[str, Any]]) -> str:
    """Each distinct failure once, with the clients it hit: 'RuntimeError: boom (clients 1, 4)'."""
    hit: dict[str, list[int]] = {}
    for failure in failures:
        hit.setdefault(failure["reason"], []).append(failure["client"])
    return "; ".join(f"{reason} (client{'s' if len(clients) > 1 else ''} {', '.join(map(str, sorted(clients)))})"
                     for reason, clients in hit.items())


def collect(replies: list[Message], sent: dict[int, int], references: dict[int, Weights],
            server_round: int) -> RoundOutcome:
    """Check every reply against the weights its client received; anything odd becomes a failure, not a crash."""
    outcome = RoundOutcome()
    answered: set[int] = set()
    for reply in replies:
        client = sent.get(reply.metadata.src_node_id)
        if client is None:
            continue
        if reply.has_content():
            outcome.received[client] = outcome.received.get(client, 0) + payload_bytes(reply.content)
        if client in answered:
            continue
        answered.add(client)
        if reply.has_error():
            outcome.fail(client, f"client raised: {reply.error.reason}", server_round)
            continue
        records = reply.content.array_records
        metrics = reply.content.metric_records.get(P.METRICS)
        if P.WEIGHTS not in records or metrics is None or P.NUM_EXAMPLES not in metrics:
            outcome.fail(client, "reply lacks weights, metrics or num-examples", server_round)
            continue
        weights = from_record(records[P.WEIGHTS])
        num_examples = int(metrics[P.NUM_EXAMPLES])
        problem = update_problem(references[client], weights) or (None if num_examples > 0 else "num-examples <= 0")
        if problem:
            outcome.fail(client, problem, server_round)
            continue
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        outcome.updates.append((client, reply, num_examples, scalars))
        outcome.update_norms[client] = update_norm(references[client], weights)
    for client in sorted(set(sent.values()) - answered):
        outcome.fail(client, "no reply before the round timeout", server_round)
    outcome.updates.sort(key=lambda item: item[0])  # fixed summation order -> reproducible averages
    return outcome


def traffic(sent: dict[int, int], received: dict[int, int], history: list[dict[str, Any]]) -> dict[str, Any]:
    """The round's bytes per sampled client (JSON keys are strings, so they are strings here too), their sums,
    and the sums over every round so far (``history`` holds the earlier rows; a resumed run keeps counting)."""
    by_client = {str(c): {"sent": sent[c], "received": received.get(c, 0)} for c in sorted(sent)}
    bytes_sent, bytes_received = sum(sent.values()), sum(received.get(c, 0) for c in sent)
    return {"bytes_sent": bytes_sent, "bytes_received": bytes_received, "bytes_by_client": by_client,
            "bytes_sent_cumulative": bytes_sent + sum(row["bytes_sent"] for row in history),
            "bytes_received_cumulative": bytes_received + sum(row["bytes_received"] for row in history)}


def round_metrics(server_round: int, sampled: list[int], outcome: RoundOutcome, seconds: float,
                  traffic_fields: dict[str, Any], private: bool = False) -> dict[str, Any]:
    """One metrics.jsonl row: sample-weighted client metrics plus traffic, timing and failures, and the median and
    largest client update norm, from which a DP clipping norm can be chosen; not in a DP run, whose published
    metrics must not describe single clients' updates (and not under SecAgg+, where the server sees none)."""
    total = sum(n for _, _, n, _ in outcome.updates)
    names = sorted({k for *_, metrics in outcome.updates for k in metrics}
                   - {P.NUM_EXAMPLES, P.CLIENT_TIME, P.TASK_REUSED})
    row: dict[str, Any] = {
        "round": server_round,
        "sampled": len(sampled),
        "successes": len(outcome.updates),
        "failures": len(outcome.failures),
        "round_time_s": seconds,
        **traffic_fields,
        "num_examples": total,
        "client_time_sum_s": sum(m.get(P.CLIENT_TIME, 0.0) for *_, m in outcome.updates),
        "client_time_max_s": max((m.get(P.CLIENT_TIME, 0.0) for *_, m in outcome.updates), default=0.0),
        # clients whose ClientApp process still held the task (its model) from an earlier message
        "clients_reusing_task": sum(int(m.get(P.TASK_REUSED, 0.0)) for *_, m in outcome.updates),
        "clients": [client for client, *_ in outcome.updates],
        "failed": outcome.failures,
    }
    if outcome.update_norms and not private:
        norms = sorted(outcome.update_norms.values())
        row |= {"update_norm_median": float(np.median(norms)), "update_norm_max": norms[-1]}
    for name in names:
        pairs = [(m[name], n) for _, _, n, m in outcome.updates if name in m]
        row[f"train/{name}"] = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
    return row


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
