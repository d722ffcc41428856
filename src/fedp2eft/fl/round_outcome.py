"""What one round's replies came to, for the server loop (``server_app.py``): each reply vetted against what its
client was sent (usable updates, failures with a one-line reason and the full one in ``client_errors.log``), the
bytes moved, and the round's metrics.jsonl row."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict

from fedp2eft.fl import protocol as P
from fedp2eft.fl.weights import Weights, from_record, update_norm, update_problem

logger = logging.getLogger(__name__)


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
