"""Would the learning-rate choices change with more validation data, and which rule chooses better? Read from a
run's validation rows only; no test data are read.

A run folder whose selection used k clients per language (``selection.clients_per_language: k``) holds every
validation row of those clients in ``selection.jsonl``.

(1) Stability: the runner's own rule (``chosen_scales``) re-applied to the first j = 1..k clients of each language
    (in client-id order), pooled over budgets (the default rule) and per budget: each method's chosen scale per
    budget. A choice that moves when the validation data grow was not settled by the smaller amount.
(2) Held-out comparison of the two rules (k >= 2): in fold i, the i-th client of every language is held out, both
    rules choose on the others, and each choice is scored on the held-out clients' validation rows; the counts are
    summed over the k folds. So each rule is judged on validation sentences it did not choose on.

    python docs/experiments/selection_stability.py --run results/default-sel3
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedp2eft.benchmark.run_folder import read_jsonl, run_config
from fedp2eft.benchmark.lr_selection import chosen_scales


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
    if most >= 2:
        held_out(config, records, by_language, most)


def held_out(config: dict, records: list[dict], by_language: dict[str, list[str]], folds: int) -> None:
    """Part (2): per method and budget, held-out accuracy of the pooled and the per-budget rule's choices, and the
    difference over everything with a bootstrap over the held-out clients (stratified by language)."""
    right = {rule: defaultdict(float) for rule in (False, True)}
    seen = defaultdict(float)  # held-out sentences per method and budget: the same at every scale, so for both rules
    per_client = {rule: defaultdict(float) for rule in (False, True)}
    for fold in range(folds):
        out = {sorted(clients)[fold] for clients in by_language.values()}
        train = [record for record in records if record["client"] not in out]
        held = [record for record in records if record["client"] in out]
        for row in (row for record in held for row in record["rows"] if row["scale"] == config["selection"]["grid"][0]):
            seen[row["method"], row["budget"]] += row["count"]
        for per_budget in (False, True):
            chosen = choices(config, train, per_budget)
            for record in held:
                for row in record["rows"]:
                    if chosen[row["method"]][row["budget"]] == row["scale"]:
                        right[per_budget][row["method"], row["budget"]] += row["correct"]
                        per_client[per_budget][record["language"], record["client"]] += row["correct"]
    print(f"\nheld-out validation accuracy of each rule's choice ({folds} folds, one client per language held out "
          f"in each), pooled / per budget, at budgets {config['budgets']}:")
    for method in [method for method in config["methods"] if (method, config["budgets"][0]) in seen]:
        shares = [(100 * right[False][method, b] / seen[method, b], 100 * right[True][method, b] / seen[method, b])
                  for b in config["budgets"]]
        print(f"  {method:<20}" + "   ".join(f"{pooled:.1f} / {per:.1f}" for pooled, per in shares))
    clients = sorted(per_client[False])
    difference = np.array([per_client[True][c] - per_client[False][c] for c in clients])
    total = sum(seen.values())
    rng = np.random.default_rng(0)
    strata = [np.array([i for i, c in enumerate(clients) if c[0] == language]) for language in sorted(by_language)]
    draws = [sum(difference[rng.choice(group, len(group))].sum() for group in strata) for _ in range(10_000)]
    low, high = np.percentile(draws, [2.5, 97.5]) / total * 100
    print(f"  all methods and budgets: pooled {100 * sum(right[False].values()) / total:.2f}, per budget "
          f"{100 * sum(right[True].values()) / total:.2f}; per budget minus pooled "
          f"{100 * difference.sum() / total:+.2f} [{low:+.2f}, {high:+.2f}] (95%, bootstrap over the {len(clients)} "
          f"held-out clients; {int(total)} held-out sentences per rule)")


if __name__ == "__main__":
    main()
