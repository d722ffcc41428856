"""Would the learning-rate choices change with more validation data? Read from a run's validation rows only.

A run folder whose selection used k clients per language (``selection.clients_per_language: k``) holds every
validation row of those clients in ``selection.jsonl``. This script re-applies the runner's own rule
(``chosen_scales``) to the first j = 1..k clients of each language (in client-id order), pooled over budgets (the
default rule) and per budget, and prints each method's chosen scale per budget. A choice that moves when the
validation data grow was not settled by the smaller amount. No test data are read.

    python benchmarks/selection_stability.py --run results/default-sel3
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from fedp2eft.benchmark.runner import chosen_scales, read_jsonl, run_config


def choices(config: dict, records: list[dict], per_budget: bool) -> dict[str, dict[int, float]]:
    """The runner's choice for every method, each method judged on the records that validated it."""
    rule = {**config, "selection": {**config["selection"], "per_budget": per_budget}}
    chosen = {}
    for methods in {tuple(record["methods"]) for record in records}:
        scales = chosen_scales(rule, [record for record in records if tuple(record["methods"]) == methods])
        chosen.update({method: scales[method] for method in methods})
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder with selection.jsonl")
    args = parser.parse_args()
    config = run_config(args.run)
    records = read_jsonl(args.run / "selection.jsonl")
    by_language: dict[str, list[str]] = defaultdict(list)
    for record in records:
        if record["client"] not in by_language[record["language"]]:
            by_language[record["language"]].append(record["client"])
    most = min(len(clients) for clients in by_language.values())
    for count in range(1, most + 1):
        kept = {client for clients in by_language.values() for client in sorted(clients)[:count]}
        subset = [record for record in records if record["client"] in kept]
        sentences = subset[0]["rows"][0]["count"]  # one client's validation split
        print(f"{count} client(s) per language: {len(kept)} clients x {sentences} validation sentences; a pooled "
              f"decision sees {len(kept) * sentences * len(config['budgets'])}, a per-budget one "
              f"{len(kept) * sentences}")
        for per_budget in (False, True):
            chosen = choices(config, subset, per_budget)
            methods = [method for method in config["methods"] if method in chosen]
            print(f"  {'per budget' if per_budget else 'pooled':<11}" + "; ".join(
                f"{method} " + "/".join(f"x{chosen[method][budget]:g}" for budget in config["budgets"])
                for method in methods))


if __name__ == "__main__":
    main()
