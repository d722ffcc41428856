"""From a run's records to what the statistics work on: per (pool, method, budget) setting, one unit per (seed,
client) with its language and the metric's sum and count; and which pools, budgets and methods a table shows, in
which order."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from fedp2eft.core.methods import METHODS

KNOWN_METHODS = ["base", *METHODS]  # the registry's order: baselines first, FedP²EFT last
OURS = "fedp2eft"
ABLATIONS = {name for name, spec in METHODS.items() if spec.ablation_of}  # own variants, never baselines
METRIC_LABELS = {"accuracy": "accuracy", "rouge_l": "ROUGE-L F1", "exact_match": "exact match",
                 "token_accuracy": "next-token accuracy"}
Setting = tuple[str, str, int]          # (pool, method, budget)
Unit = tuple[str, float, int]           # (language, correct or summed score, count)
Units = dict[tuple[int, str], Unit]     # (seed, client) -> unit


def method_order(methods: Iterable[str]) -> list[str]:
    """Registered methods in the registry's order, then every other method that produced rows, sorted: a method
    must show up in the tables rather than vanish because nobody added it to a list."""
    present = set(methods)
    return [m for m in KNOWN_METHODS if m in present] + sorted(present - set(KNOWN_METHODS))


def is_baseline(method: str) -> bool:
    """A method FedP²EFT is measured against: neither FedP²EFT, nor the base model without personalization, nor
    one of FedP²EFT's own ablations."""
    return method not in (OURS, "base") and method not in ABLATIONS


def row_metrics(records: list[dict]) -> list[str]:
    """The metrics the rows carry, the main one first (rows written before metrics were named hold accuracy)."""
    for record in records:
        for row in record["rows"]:
            return list(row.get("scores", {"accuracy": None}))
    return ["accuracy"]


def _pair(row: dict, metric: str | None) -> tuple[float, int]:
    """(sum, count) of ``metric`` in a row; the row's main metric when ``metric`` is None."""
    if metric is None or "scores" not in row:
        return float(row["correct"]), int(row["count"])
    total, count = row["scores"][metric]
    return float(total), int(count)


def client_units(records: list[dict], metric: str | None = None) -> dict[Setting, Units]:
    """(pool, method, budget) -> {(seed, client): (language, correct, count)} of ``metric`` (the main one by
    default). Clients without a test example are left out: they carry no score, and a resample made only of them
    would be 0/0."""
    units: dict[Setting, Units] = defaultdict(dict)
    for record in records:
        for row in record["rows"]:
            total, count = _pair(row, metric)
            if count > 0:
                units[(record["pool"], row["method"], row["budget"])][(record["seed"], record["client"])] = (
                    record["language"], total, count)
    return dict(units)


def per_language(records: list[dict], metric: str | None = None) -> dict[tuple, float]:
    """(seed, pool, method, budget, language) -> ``metric`` pooled over the language's clients (sum / count)."""
    correct: dict[tuple, float] = defaultdict(float)
    count: dict[tuple, int] = defaultdict(int)
    for record in records:
        for row in record["rows"]:
            key = (record["seed"], record["pool"], row["method"], row["budget"], record["language"])
            total, n = _pair(row, metric)
            correct[key] += total
            count[key] += n
    return {key: correct[key] / count[key] for key in count if count[key] > 0}


def _at(table: Mapping[Setting, object], pool: str, method: str, budget: int):
    """The entry of ``method`` at ``budget``; a method without a rank budget (``base``) keeps its rows at budget 0
    and stands in every budget column."""
    if (pool, method, budget) in table:
        return table[(pool, method, budget)]
    return table.get((pool, method, 0))


def _pools(config: dict, keys: Iterable[Setting]) -> list[str]:
    pools = list(config.get("pools", []))
    return pools + sorted({k[0] for k in keys} - set(pools))


def _budgets(config: dict, keys: Iterable[Setting]) -> list[int]:
    return sorted(set(config.get("budgets", [])) | {k[2] for k in keys if k[2] != 0})


def _table_methods(config: dict, keys: Iterable[Setting]) -> list[str]:
    """Methods that produced rows plus those the config asked for (a method that produced nothing shows '–')."""
    return method_order({k[1] for k in keys} | set(config.get("methods", [])))
