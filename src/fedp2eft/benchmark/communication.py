"""Communication of a benchmark run: the bytes each federated stage moved, summed from the per-round, per-client
counts the server writes to the stage's ``metrics.jsonl`` (docs/federation.md, "Outputs"), and, for comparison,
what shipping every personalized FedP²EFT adapter of the run would cost instead.

An adapter's size follows from its ranks and the base model's module shapes: a LoRA of rank r on a linear layer
with ``in`` inputs and ``out`` outputs stores A (r x in) and B (out x r), so a PEFT adapter holds
``Σ_m r_m · (in_m + out_m)`` float32 numbers (docs/method.md, "Budget selection and personalization"; PEFT keeps
LoRA weights in float32 by default)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import safe_open

from fedp2eft.fl.checkpoint import METRICS_FILE

FLOAT32_BYTES = 4
MB = 1e6


@dataclass(frozen=True)
class Traffic:
    """Bytes one federated stage moved over ``runs`` runs (one per seed): ``sent`` server -> clients, ``received``
    clients -> server; ``client_rounds`` counts (sampled client, round) pairs, the unit of the per-client means."""

    runs: int
    rounds: int
    client_rounds: int
    sent: int
    received: int

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def per_round(self) -> tuple[float, float]:
        return self.sent / self.rounds, self.received / self.rounds

    def per_client_round(self) -> tuple[float, float]:
        return self.sent / self.client_rounds, self.received / self.client_rounds

    def record(self) -> dict:
        """Totals and means, as data for results.json."""
        return {**asdict(self), "per_round": dict(zip(("sent", "received"), self.per_round())),
                "per_client_round": dict(zip(("sent", "received"), self.per_client_round()))}


def read_rounds(path: Path) -> list[dict]:
    """The round rows of a ``metrics.jsonl``; a torn line (an interrupted run) is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [row for row in rows if isinstance(row, dict) and "round" in row]


def stage_traffic(path: Path) -> Traffic | None:
    """The traffic of one stage's run from its ``metrics.jsonl``; None when its rows carry no byte counts."""
    rows = [row for row in read_rounds(path) if "bytes_sent" in row]
    if not rows:
        return None
    return Traffic(runs=1, rounds=len(rows), client_rounds=sum(row["sampled"] for row in rows),
                   sent=sum(row["bytes_sent"] for row in rows), received=sum(row["bytes_received"] for row in rows))


def stage_logs(run_dir: Path) -> dict[str, list[Path]]:
    """Stage name -> its ``metrics.jsonl`` files: ``base/`` once per run, every method stage once per seed
    (``seed<s>/<stage>/``, see ``runner.py``), and once per grid point of a stage trained per point
    (``seed<s>/<stage>/x<point>/``)."""
    logs = {"base": [run_dir / "base" / METRICS_FILE]} if (run_dir / "base" / METRICS_FILE).is_file() else {}
    for path in sorted(run_dir.glob(f"seed*/*/{METRICS_FILE}")) + sorted(run_dir.glob(f"seed*/*/x*/{METRICS_FILE}")):
        logs.setdefault(path.relative_to(run_dir).parts[1], []).append(path)
    return logs


def run_traffic(run_dir: Path) -> dict[str, Traffic]:
    """Stage name -> its traffic summed over seeds; a stage logged before bytes were counted is left out."""
    totals = {}
    for stage, paths in stage_logs(run_dir).items():
        counted = [traffic for path in paths if (traffic := stage_traffic(path)) is not None]
        if counted:
            totals[stage] = sum(counted[1:], counted[0])
    return totals


def recorded_traffic(results_file: Path) -> dict[str, Traffic]:
    """Stage name -> the traffic an earlier report of the run recorded in its ``results.json``: what a report written
    again keeps for a stage whose logs are gone (a published copy of a run holds its results, not every log)."""
    if not results_file.is_file():
        return {}
    stages = json.loads(results_file.read_text()).get("communication", {}).get("stages", {})
    return {name: Traffic(**{key: record[key] for key in ("runs", "rounds", "client_rounds", "sent", "received")})
            for name, record in stages.items()}


def module_shapes(model_dir: Path, modules: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of each module, read from the headers of the base checkpoint's ``model*.safetensors`` (no tensor is
    loaded). A wrapper may prefix the module names (``SequenceClassifier`` keeps the encoder under ``encoder.``), so
    a module takes the 2-D weight named by the longest suffix of its name; a module without one is left out."""
    weights: dict[str, tuple[int, int]] = {}
    for path in sorted(Path(model_dir).glob("model*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                if key.endswith(".weight") and len(shape) == 2:
                    weights[key.removesuffix(".weight")] = (shape[0], shape[1])
    shapes = {}
    for module in modules:
        parts = module.split(".")
        found = next((weights[s] for i in range(len(parts)) if (s := ".".join(parts[i:])) in weights), None)
        if found is not None:
            shapes[module] = found
    return shapes


def adapter_bytes(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> int:
    """Bytes of the LoRA weights of one adapter: 4 · Σ_m r_m · (in_m + out_m) (modules of rank 0 hold nothing)."""
    return FLOAT32_BYTES * sum(rank * (shapes[m][0] + shapes[m][1]) for m, rank in ranks.items() if rank > 0)


def adapters_shipped(records: list[dict], method: str, model_dir: Path | None) -> dict | None:
    """How many adapters ``method`` made in the run (seeds x pools x clients x budgets) and their summed size;
    None when it made none or a module's shape is not in the base checkpoint."""
    rows = [row for record in records for row in record["rows"] if row["method"] == method and "ranks" in row]
    if not rows or model_dir is None:
        return None
    modules = {m for row in rows for m in row["ranks"]}
    shapes = module_shapes(model_dir, modules)
    if set(shapes) != modules:
        return None
    return {"method": method, "adapters": len(rows), "seeds": len({record["seed"] for record in records}),
            "bytes": sum(adapter_bytes(row["ranks"], shapes) for row in rows)}


def _mb(value: float) -> str:
    """Megabytes to three significant digits, whole megabytes from 100 on (no exponent in a table)."""
    megabytes = value / MB
    return f"{megabytes:,.0f}" if megabytes >= 100 else f"{megabytes:.3g}"


def communication_markdown(stages: dict[str, Traffic], adapters: dict | None, method_label: str) -> str:
    """The report's table: per stage (summed over seeds) total MB each way and MB per sampled client and round,
    then the one-way cost of shipping every personalized adapter, with what the numbers count."""
    lines = ["| stage | runs | rounds | client-rounds | MB sent | MB received | MB per client and round, "
             "sent / received |", "|---|---|---|---|---|---|---|"]
    for stage, traffic in stages.items():
        sent, received = traffic.per_client_round()
        lines.append(f"| {stage} | {traffic.runs} | {traffic.rounds} | {traffic.client_rounds} | {_mb(traffic.sent)} "
                     f"| {_mb(traffic.received)} | {_mb(sent)} / {_mb(received)} |")
    if adapters:
        lines.append(f"| every {method_label} adapter, shipped once instead | {adapters['seeds']} | – | "
                     f"{adapters['adapters']} adapters | {_mb(adapters['bytes'])} | – | "
                     f"{_mb(adapters['bytes'] / adapters['adapters'])} per adapter |")
    notes = ("Bytes are the tensors of each message as Flower counts them (`ArrayRecord.count_bytes()`: each "
             "tensor's NumPy serialization and its name), per sampled client and round, written by the server to "
             "each stage's metrics.jsonl (docs/federation.md). Sent = server to clients (the global weights, once per "
             "sampled client; HetLoRA's and FlexLoRA's clients are sent only their own budget's components); received = clients to server (every reply that arrived, refused ones included). "
             "Config and metric records, message metadata, protobuf/gRPC framing and TLS are not counted: these "
             "are lower bounds of the wire traffic. MB = 10^6 bytes; rows are summed over seeds.")
    if adapters:
        notes += (f"\n\nThe last row is what moving each of the run's {adapters['adapters']} personalized "
                  f"{method_label} adapters (seeds x pools x clients x budgets) once would cost, e.g. to collect them "
                  "on the server or to personalize centrally and deliver them: Σ over adapters of 4 · Σ_m r_m · "
                  "(in_m + out_m) bytes, from the ranks in personalize.jsonl and the module shapes of the base "
                  "checkpoint (a float32 LoRA of rank r on an in -> out layer stores A: r x in and B: out x r); "
                  f"files' headers and adapter_config.json are not counted. {method_label} itself ships no adapter: "
                  "each client builds its own locally.")
    else:
        notes += (f"\n\nThe cost of shipping every {method_label} adapter is not shown: the run has no "
                  f"{method_label} rows with ranks, or the base checkpoint's module shapes could not be read.")
    return "\n".join(lines) + "\n\n" + notes + "\n"
