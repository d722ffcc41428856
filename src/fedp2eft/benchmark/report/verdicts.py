"""Does FedP²EFT win? Its paired differences with every other method, against the best baseline of each cell,
and the verdict that names every loss."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from fedp2eft.benchmark.report.formatting import _signed
from fedp2eft.benchmark.report.records import ABLATIONS, OURS, Setting, _at, _budgets, _pools, _table_methods, \
    is_baseline


def comparison_markdown(comparisons: list[dict], config: dict, summary: Mapping[Setting, dict]) -> str:
    """Rows = other method, columns = pool and budget, cells = FedP²EFT minus it with the paired interval."""
    pools, budgets = _pools(config, summary), _budgets(config, summary)
    settings = [(p, b) for p in pools for b in budgets]
    listed = [m for m in _table_methods(config, summary) if m != OURS]
    others = [m for m in listed if m not in ABLATIONS] + [m for m in listed if m in ABLATIONS]
    cells = {(c["method"], c["pool"], c["budget"]): c for c in comparisons}
    lines = ["| FedP²EFT minus | " + " | ".join(f"{p} r={b}" for p, b in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for method in others:
        row = []
        for pool, budget in settings:
            c = cells.get((method, pool, budget))
            row.append("–" if c is None else
                       f"{_signed(c['difference'])} [{_signed(c['ci_low'])}, {_signed(c['ci_high'])}] {c['outcome']}")
        lines.append(f"| {method}{' (own ablation)' if method in ABLATIONS else ''} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def best_baseline_gaps(summary: Mapping[Setting, dict], comparisons: list[dict], pool: str,
                       budgets: Sequence[int]) -> dict[int, dict]:
    """Budget -> FedP²EFT minus the best baseline of that column (by mean; ``is_baseline``), with the paired
    interval of that comparison."""
    gaps = {}
    for budget in budgets:
        rivals = [c for c in comparisons if c["pool"] == pool and c["budget"] == budget and is_baseline(c["method"])]
        if rivals:
            gaps[budget] = max(rivals, key=lambda c: _at(summary, pool, c["method"], budget)["mean"])
    return gaps


def best_baseline_markdown(summary: Mapping[Setting, dict], comparisons: list[dict], pools: Sequence[str],
                           budgets: Sequence[int]) -> str:
    """FedP²EFT minus the best baseline of each cell (by mean; ``is_baseline``), with the paired interval: the
    comparison a user choosing one method per budget cares about, and the paper's claim."""
    lines = ["| FedP²EFT minus the best baseline | " + " | ".join(f"r={b}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for pool in pools:
        gaps = best_baseline_gaps(summary, comparisons, pool, budgets)
        cells = [f"{_signed(c['difference'])} [{_signed(c['ci_low'])}, {_signed(c['ci_high'])}] {c['outcome']} "
                 f"(vs {c['method']})" if (c := gaps.get(b)) else "–" for b in budgets]
        lines.append(f"| {pool} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _counts(comparisons: list[dict]) -> str:
    counts = Counter(c["outcome"] for c in comparisons)
    return f"wins {counts['win']}, ties {counts['tie']} and loses {counts['loss']} of {len(comparisons)}"


def _claim(cells: list[dict]) -> str:
    """What the cells' outcomes against the best baseline say, every loss named."""
    counts = Counter(c["outcome"] for c in cells)
    losses = [f"{c['pool']} r={c['budget']} (to {c['method']})" for c in cells if c["outcome"] == "loss"]
    if losses:
        return (f" It loses at {', '.join(losses)}: FedP²EFT does not beat the best baseline everywhere in this run; "
                "docs/discussion.md discusses why.")
    if counts["tie"]:
        return (f" It loses nowhere, but {counts['tie']} cell(s) are within noise: this run cannot tell FedP²EFT "
                "from the best baseline there.")
    return (" It beats the best baseline in every cell of this run." if not counts["untested"] else
            " It beats the best baseline in every cell that has an interval.")


def verdict(comparisons: list[dict], summary: Mapping[Setting, dict]) -> str:
    """The paper's claim, tested: FedP²EFT against the best baseline of each (pool, budget) cell (own ablations
    and the base model are not baselines), with every loss named; then the count against every baseline
    separately and against each ablation, apart."""
    if not comparisons:
        return "FedP²EFT has no comparable rows in this run, so there is nothing to compare."
    pools, budgets = list(dict.fromkeys(c["pool"] for c in comparisons)), sorted({c["budget"] for c in comparisons})
    cells = [gap for pool in pools for gap in best_baseline_gaps(summary, comparisons, pool, budgets).values()]
    if not cells:
        return "This run has no baseline to compare FedP²EFT with (only its own ablations or the base model)."
    counts = Counter(c["outcome"] for c in cells)
    line = (f"**Verdict:** against the best baseline of each cell, FedP²EFT {_counts(cells)} cells (win = the 95% "
            "interval of the difference lies above zero).")
    if counts["untested"]:
        line += (f" {counts['untested']} cell(s) have no interval, because a language has a single client to "
                 "resample: they are neither wins nor losses, only single measurements.")
    if counts["untested"] < len(cells):
        line += _claim(cells)
    baselines = [c for c in comparisons if is_baseline(c["method"])]
    line += f" Against every baseline separately it {_counts(baselines)} comparisons."
    for ablation in sorted({c["method"] for c in comparisons} & ABLATIONS):
        own = [c for c in comparisons if c["method"] == ablation]
        line += f" Against its own ablation {ablation} (not a baseline) it {_counts(own)}."
    return line
