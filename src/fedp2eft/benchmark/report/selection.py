"""The learning-rate selection table: the rate each method got on validation data, and every grid point it was
chosen from."""

from __future__ import annotations

import math

from fedp2eft.benchmark.report.formatting import _lr, _pct
from fedp2eft.benchmark.report.records import METRIC_LABELS, method_order


def _is_pick(point: dict, pick) -> bool:
    """Whether a grid point is the chosen one: ``chosen`` holds the grid scale when points carry one (the
    runner's format), else the learning rate itself."""
    if pick is None:
        return False
    return math.isclose(float(point["scale"] if "scale" in point else point["lr"]), float(pick))


def _chosen_cell(points: list[dict], pick) -> str:
    """The chosen learning rate (and its grid scale when known); the raw choice if no grid point matches."""
    if pick is None:
        return "–"
    match = next((r for r in points if _is_pick(r, pick)), None)
    if match is None:
        return _lr(pick)
    return _lr(match["lr"]) + (f" (x{_lr(match['scale'])})" if "scale" in match else "")


def _grid_edge_note(selection: dict, chosen: dict[str, dict[int, float]]) -> str:
    """How many choices sit on the grid's lowest or highest scale: there the best setting may lie outside it."""
    grid = sorted(float(g) for g in selection.get("grid", []))
    if len(grid) < 2 or not all("scale" in r for r in selection.get("results", [{}])):
        return ""  # choices are grid scales only when the points carry them (see ``_is_pick``)
    picked = [float(scale) for per in chosen.values() for scale in per.values()]
    low, high = sum(s == grid[0] for s in picked), sum(s == grid[-1] for s in picked)
    return (f"\n{low + high} of {len(picked)} choices lie on an edge of the grid (x{_lr(grid[0])}: {low}, "
            f"x{_lr(grid[-1])}: {high}); where they do, a wider grid might choose a better setting.")


def selection_markdown(selection: dict) -> str:
    """The learning rate each method got (chosen on a validation split of seen clients' training data), and the
    validation accuracy of every grid point it was chosen from (chosen one in bold)."""
    chosen = {m: {int(b): v for b, v in per.items()} for m, per in selection.get("chosen", {}).items()}
    results = selection.get("results", [])
    methods = method_order(set(chosen) | {r["method"] for r in results})
    budgets = sorted({b for per in chosen.values() for b in per} | {int(r["budget"]) for r in results})
    if not methods or not budgets:
        return "selection.json holds no choices."

    def points(method: str, budget: int) -> list[dict]:
        return sorted((r for r in results if r["method"] == method and int(r["budget"]) == budget),
                      key=lambda r: r["lr"])

    head = ("| method | " + " | ".join(f"r={b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets))
    lines = [f"Grid (multiples of each method's default learning rate): "
             f"{', '.join(_lr(g) for g in selection.get('grid', []))}; validation fraction "
             f"{selection.get('validation_fraction', '–')} of the training data of "
             f"{len(selection.get('clients', []))} {selection.get('pool', 'seen')} clients "
             f"({', '.join(selection.get('clients', []))}); their test data were not used.\n",
             *([f"This run did not select: it applies the choice made in `{selection['reused_from']}` unchanged.\n"]
               if selection.get("reused_from") else []),
             ("One scale per method and budget, chosen on that budget's validation rows.\n"
              if selection.get("per_budget", True) else
              "One scale per method for every budget, chosen on the validation rows of all budgets pooled "
              "(`selection.per_budget: false`; docs/method.md, \"Benchmark regime\").\n"),
             *[f"{method}'s learning rate is `{setting}`: its federated stage was trained once per grid point and "
               "each was validated.\n" for method, setting in selection.get("rate_of", {}).items()],
             "**Chosen learning rate** (grid scale in brackets)\n", *head]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(_chosen_cell(points(method, b), chosen.get(method, {}).get(b))
                                                  for b in budgets) + " |")
    lines.append(_grid_edge_note(selection, chosen))
    label = METRIC_LABELS.get(selection.get("metric", "accuracy"), selection.get("metric"))
    lines += [f"\n**Validation {label} % of every grid point** (`lr: {label}`, chosen in bold)\n", *head]
    for method in methods:
        cells = []
        for budget in budgets:
            pick = chosen.get(method, {}).get(budget)
            parts = [f"{_lr(r['lr'])}: {_pct(r['val_accuracy'])}" for r in points(method, budget)]
            parts = [f"**{text}**" if _is_pick(r, pick) else text for r, text in zip(points(method, budget), parts)]
            cells.append(" · ".join(parts) or "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
