"""Does the best learning rate depend on the rank? Per method and budget, the learning-rate scale with the best
validation score pooled over a run's validation clients, read from the ``selection.json`` of finished runs (their
validation rows only: the clients' training data split 80/20; no test score is read).

LoRA here scales its update by alpha / r = 2 at every rank (alpha = 2r, the paper's), so under Adam, whose steps
have about the size of the learning rate whatever the gradient, a rank-r update moves about r directions at once
and the rate that suits r = 2 overshoots at r = 16. AdaLoRA scales by alpha / r with a fixed alpha, so its best
rate should not move with the rank; the others' should fall. docs/method.md, "Learning rate and rank", quotes the
output.

    python docs/experiments/lr_by_rank.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path


def best_scales(selection: dict) -> dict[str, dict[int, float]]:
    """Method -> budget -> the grid scale with the best pooled validation score (ties: the smaller scale)."""
    pooled: dict[tuple[str, int], dict[float, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for row in selection["results"]:
        totals = pooled[(row["method"], row["budget"])][row["scale"]]
        totals[0] += row["val_accuracy"] * row["val_count"]
        totals[1] += row["val_count"]
    best: dict[str, dict[int, float]] = defaultdict(dict)
    for (method, budget), by_scale in pooled.items():
        best[method][budget] = max(by_scale, key=lambda s: (by_scale[s][0] / by_scale[s][1], -s))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (each with a selection.json)")
    args = parser.parse_args()
    for run in args.runs:
        selection = json.loads((run / "selection.json").read_text())
        print(f"{run} (grid {selection['grid']}, {len(selection['clients'])} validation clients, "
              f"metric {selection.get('metric', 'accuracy')})")
        for method, by_budget in sorted(best_scales(selection).items()):
            budgets = sorted(by_budget)
            cells = "  ".join(f"r={b}: x{by_budget[b]:g}" for b in budgets)
            low, high = budgets[0], budgets[-1]
            slope = (math.log(by_budget[high] / by_budget[low]) / math.log(high / low)) if high > low else 0.0
            print(f"  {method:<19} {cells}   best scale ~ r^{slope:+.2f}")


if __name__ == "__main__":
    main()
