"""Where the budget binds: uniform LoRA at the smallest and the largest budget, scored on validation rows only, in
settings that change one thing at a time (docs/discussion.md, "Where the budget binds").

Each setting is the default profile (the decoder's: the `llm` profile) with a few overrides, run as ``fedp2eft benchmark`` with ``methods=[lora]``,
the two budgets and learning-rate selection on every unseen client (``selection.clients_per_language=3``: each
client's *training* data split 80/20). Its validation rows (``selection.jsonl``: every client, budget and
learning-rate scale) are read back; the run's test scores are never read. The learning-rate scale is chosen as the
benchmark chooses it (one scale for both budgets, pooled validation accuracy) and, beside it, one scale per budget,
both by cross-fitting: clients are split into two folds within each language, and each fold is scored at the scale
the *other* fold chose, so no client's score chose its own scale. The table gives, per setting and rule, uniform
LoRA's validation accuracy at r_min and r_max, the difference with the 95% paired client-bootstrap interval
(stratified by language, as the report's), and the run's wall time.

    python docs/experiments/budget_binding.py [--settings default more-sentences ...] [--results results/budget-binding]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from fedp2eft.benchmark.report.stats import metric, paired_bootstrap
from fedp2eft.cli import main as fedp2eft

BUDGETS = (2, 16)
COMMON = ["methods=[lora]", f"budgets=[{','.join(map(str, BUDGETS))}]", "pools=[unseen]",
          "selection.clients_per_language=3"]
# One change at a time from the default profile (docs/method.md, "Benchmark regime"). A setting that keeps the
# default's data reuses its base model ({default_base}); one that changes the data trains its own, so no unseen
# client's sentences were memorized by the base model.
SETTINGS = {
    "default": [],
    "more-epochs": ["personalize.epochs=8", "base.checkpoint={default_base}"],
    "balanced-labels": ["dataset_options.alpha=5.0"],
    "more-sentences": ["dataset_options.train_size=192"],
    "more-sentences-and-epochs": ["dataset_options.train_size=192", "personalize.epochs=8"],
    # Fewer places to spend rank: LoRA on the 12 attention value projections only (a memory-bound client's choice),
    # so the budget's r x M is 24 directions at r=2 instead of 144.
    "values-only": ["personalize.target_modules=[value]", "base.checkpoint={default_base}"],
    # The same with the grid moved up (x3 to x300): on the main grid every value-only LoRA peaked at its top edge.
    "values-only-wide-grid": ["personalize.target_modules=[value]", "base.checkpoint={default_base}",
                              "selection.grid=[3.0,10.0,30.0,100.0,300.0]"],
    # The embedded decoder instruction-tuned on intents-chat (the `llm` profile: Gemma 3 270M, ROUGE-L of greedy
    # replies), with the encoder's selection grid and three clients per language so that clients can be replicates.
    "decoder": ["dataset_options.clients_per_language=3", "selection.grid=[1.0,3.0,10.0,30.0,100.0]",
                "selection.per_budget=false"],
    # A base model that has learnt little of the task (1 federated round instead of 12): the clients' personalization
    # must then carry the task itself, not only adapt it.
    "weak-base": ["base.rounds=1"],
    "weak-base-wide-grid": ["base.rounds=1", "base.checkpoint={weak_base}",
                            "selection.grid=[3.0,10.0,30.0,100.0,300.0]"],
    # Weak base and wide grid with twice the sentences per client (96): twice the validation rows per decision.
    "weak-base-96": ["base.rounds=1", "dataset_options.train_size=96", "selection.grid=[3.0,10.0,30.0,100.0,300.0]"],
    # A relation between two requests instead of the label of one (the paper's XNLI is sentence pairs): the same
    # clients' sentences as intent pairs, same or different intent (docs/experiments/intent_pairs.py), 96 training
    # pairs per client; a base model of its own, trained on the seen clients' pairs.
    "sentence-pairs": ["dataset={intent_pairs}"],
    # The same with the grid moved up (x3 to x300): on the main grid r=2 peaked at its top edge (x30).
    "sentence-pairs-wide-grid": ["dataset={intent_pairs}", "base.checkpoint={pairs_base}",
                                 "selection.grid=[3.0,10.0,30.0,100.0,300.0]"],
}
PROFILE = {"decoder": "llm"}  # the profile a setting starts from; the others start from `default`


Units = dict[tuple[int, str], tuple[str, int, int]]  # the report's: (seed, client) -> (language, correct, count)


def cross_fitted(records: list[dict], per_budget: bool = False) -> dict[int, Units]:
    """Budget -> the report's units {(0, client): (language, correct, count)} of LoRA at the scale the other fold
    chose (best pooled validation accuracy over both budgets, or with ``per_budget`` over that budget's rows alone;
    ties to the smaller scale)."""
    seen: dict[str, int] = defaultdict(int)
    folds = {}
    for record in sorted(records, key=lambda r: r["client"]):
        folds[record["client"]] = seen[record["language"]] % 2  # within a language: A, B, A, ...
        seen[record["language"]] += 1
    rows = [(record, row) for record in records for row in record["rows"] if row["method"] == "lora"]
    scales = sorted({row["scale"] for _, row in rows})

    def chosen(fold: int, budgets: tuple[int, ...]) -> float:
        def accuracy(scale: float) -> float:
            picked = [row for record, row in rows if folds[record["client"]] == fold and row["scale"] == scale
                      and row["budget"] in budgets]
            return sum(row["correct"] for row in picked) / max(1, sum(row["count"] for row in picked))
        return max(scales, key=lambda scale: (accuracy(scale), -scale))

    scale_for = {(fold, budget): chosen(1 - fold, (budget,) if per_budget else BUDGETS)
                 for fold in (0, 1) for budget in BUDGETS}
    units: dict[int, dict] = {budget: {} for budget in BUDGETS}
    for record, row in rows:
        if row["budget"] in units and row["scale"] == scale_for[(folds[record["client"]], row["budget"])]:
            units[row["budget"]][(0, record["client"])] = (record["language"], row["correct"], row["count"])
    return units


def run_setting(name: str, overrides: list[str], results: Path) -> dict:
    """Run (or resume) one setting and summarize its validation rows."""
    run_dir = results / name
    pairs = results / "intent-pairs.jsonl"
    if any("{intent_pairs}" in o for o in overrides) and not pairs.is_file():
        subprocess.run([sys.executable, str(Path(__file__).with_name("intent_pairs.py")), "--out", str(pairs)],
                       check=True)
    overrides = [o.format(default_base=results / "default" / "base" / "model", intent_pairs=pairs,
                          pairs_base=results / "sentence-pairs" / "base" / "model",
                          weak_base=results / "weak-base" / "base" / "model") for o in overrides]
    profile = PROFILE.get(name, "default")
    if fedp2eft(["-q", "benchmark", "--config", profile, "--results", str(results), f"name={name}", *COMMON,
                 *overrides]) != 0:
        raise SystemExit(f"setting {name} failed")
    records = [json.loads(line) for line in (run_dir / "selection.jsonl").read_text().splitlines() if line.strip()]
    seconds = json.loads((run_dir / "timings.json").read_text())
    row = {"setting": name, "overrides": " ".join(overrides) or "(none)", "minutes": sum(seconds.values()) / 60}
    for rule, per_budget in (("shared", False), ("own", True)):
        units = cross_fitted(records, per_budget)
        low, high = units[min(BUDGETS)], units[max(BUDGETS)]
        difference = paired_bootstrap(high, low)
        row |= {"clients": len(low), "validation_sentences": sum(unit[2] for unit in low.values()) // len(low),
                rule: {"low": metric(low), "high": metric(high), "difference": difference.mean,
                       "ci_low": difference.low, "ci_high": difference.high, "outcome": difference.outcome}}
    return row


def _cells(result: dict) -> str:
    binds = {"win": "yes", "tie": "no", "loss": "hurts"}[result["outcome"]]
    return (f"{100 * result['low']:.1f} | {100 * result['high']:.1f} | {100 * result['difference']:+.1f} "
            f"[{100 * result['ci_low']:+.1f}, {100 * result['ci_high']:+.1f}] {binds}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--results", type=Path, default=Path("results/budget-binding"))
    args = parser.parse_args()
    rows = [run_setting(name, SETTINGS[name], args.results) for name in args.settings]
    low, high = min(BUDGETS), max(BUDGETS)
    print(f"| setting | overrides | clients | validation sentences per client | one scale for both budgets: r={low} | "
          f"r={high} | r={high} minus r={low} [95% interval], binds? | each budget its own scale: r={low} | r={high} | "
          f"r={high} minus r={low}, binds? | minutes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | `{row['overrides']}` | {row['clients']} | {row['validation_sentences']} | "
              f"{_cells(row['shared'])} | {_cells(row['own'])} | {row['minutes']:.1f} |")


if __name__ == "__main__":
    main()
