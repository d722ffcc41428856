"""The benchmark report: every table, figure and sentence of ``report.md`` is computed here from the run's own
records and files (nothing is typed in by hand), so the report can be regenerated and audited.

``write_report`` and ``write_bases_report`` are the entry points. The modules, data flowing one way: ``records``
(records to scored units) and ``formatting``; ``stats`` (the client bootstrap and paired comparisons; how the
statistics work is explained there); the analyses ``budget``, ``rank_maps``, ``psg``, ``fedl2p``, ``privacy``,
``reference`` and ``verdicts``; the tables, selection and figures; ``markdown`` (report.md) and ``console``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedp2eft.benchmark.communication import adapters_shipped, recorded_traffic, run_traffic
from fedp2eft.benchmark.report.budget import budget_effects, budget_verdict
from fedp2eft.benchmark.report.console import print_budget_verdict, print_main_table
from fedp2eft.benchmark.report.fedl2p import fedl2p_grid, fedl2p_rates
from fedp2eft.benchmark.report.figures import plot_accuracy, plot_psg_training, plot_rank_heatmap
from fedp2eft.benchmark.report.formatting import _signed
from fedp2eft.benchmark.report.markdown import report_markdown, rewritten_note
from fedp2eft.benchmark.report.privacy import privacy_spent
from fedp2eft.benchmark.report.psg import load_psg_metrics, psg_flattening
from fedp2eft.benchmark.report.rank_maps import heatmap_budget, structure
from fedp2eft.benchmark.report.records import METRIC_LABELS, OURS, _budgets, _pools, _table_methods, client_units, \
    method_order, per_language, row_metrics
from fedp2eft.benchmark.report.reference import reference_rows
from fedp2eft.benchmark.report.stats import BOOTSTRAP_SEED, LEVEL, RESAMPLES, compare, summarize
from fedp2eft.benchmark.report.tables import language_records, main_table_markdown
from fedp2eft.benchmark.report.verdicts import best_baseline_gaps, comparison_markdown, verdict

__all__ = ["write_bases_report", "write_report"]


def _jsonable(value):
    """NaN is not JSON: write null instead; tuple keys and numpy scalars become plain values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _write_csv(path: Path, language_scores: Mapping[str, Mapping[tuple, float]]) -> None:
    """One row per seed, pool, method, budget and language; one column per metric."""
    metrics = list(language_scores)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seed", "pool", "method", "budget", "language", *metrics])
        for key in sorted(language_scores[metrics[0]]):
            writer.writerow([*key, *(f"{language_scores[m][key]:.6f}" if key in language_scores[m] else ""
                                     for m in metrics)])


def write_report(config: dict, run_dir: Path, records: list[dict], stage_seconds: dict[str, float],
                 command: str, base_model: Path | None = None, rewritten_by: str | None = None) -> None:
    """Write report.md, results.json, results.csv and figures/ for a finished run, and print the main table.
    ``base_model`` (the base checkpoint folder) gives the module shapes that size the personalized adapters;
    ``rewritten_by`` names the command that wrote the report again from the run's records, if one did."""
    run_dir = Path(run_dir)
    # every method that produced a row is listed, even one whose rows hold no test example (it shows '–')
    produced = {row["method"] for record in records for row in record["rows"]}
    shown = {**config, "methods": method_order(set(config.get("methods", [])) | (produced - {"base"}))}
    metrics = row_metrics(records)
    units = client_units(records, metrics[0])
    summary = summarize(records, metric_name=metrics[0])
    pools, budgets, methods = _pools(shown, units), _budgets(shown, units), _table_methods(shown, units)
    label = METRIC_LABELS.get(metrics[0], metrics[0])
    heat_budget = heatmap_budget(records, budgets)
    selection_path = run_dir / "selection.json"
    logs = load_psg_metrics(run_dir)
    secondary = {}
    for name in metrics[1:]:
        extra = client_units(records, name)
        secondary[name] = {"summary": summarize(records, metric_name=name),
                           "comparisons": compare(extra, pools, budgets, methods)}
    facts = {"metrics": metrics, "label": label, "secondary": secondary,
             "comparisons": compare(units, pools, budgets, methods),
             "budget": budget_effects(units, summary, pools, budgets, methods), "fedl2p": fedl2p_rates(records),
             "fedl2p_grid": fedl2p_grid(run_dir),
             "structure": structure(records, pools, budgets, methods), "psg_training": psg_flattening(logs),
             "selection": json.loads(selection_path.read_text()) if selection_path.is_file() else None,
             "language_budgets": sorted({min(budgets), heat_budget}) if budgets else [], "heat_budget": heat_budget,
             "privacy": privacy_spent(run_dir), "reference": reference_rows(config, metrics[0], units),
             # a stage's logs count; the run's earlier report fills in stages whose logs are gone
             "traffic": {**recorded_traffic(run_dir / "results.json"), **run_traffic(run_dir)},
             "adapters": adapters_shipped(records, OURS, base_model),
             "rewritten_by": rewritten_by}

    figures = run_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    plot_accuracy(summary, shown, figures / "accuracy_vs_budget.png", label)
    facts["has_heatmap"] = plot_rank_heatmap(records, heat_budget, figures / "rank_heatmap.png")
    facts["has_curve"] = plot_psg_training(logs, figures / "psg_training.png")

    _write_csv(run_dir / "results.csv", {name: per_language(records, name) for name in metrics})
    (run_dir / "results.json").write_text(json.dumps(_jsonable({
        "config": config, "stage_seconds": stage_seconds, "command": command,
        "statistics": {"resamples": RESAMPLES, "bootstrap_seed": BOOTSTRAP_SEED, "level": LEVEL},
        "metric": metrics[0],
        "summary": [{"pool": p, "method": m, "budget": b, **entry} for (p, m, b), entry in summary.items()],
        "comparisons": facts["comparisons"], "budget_effects": facts["budget"], "fedl2p_rates": facts["fedl2p"],
        "fedl2p_grid": facts["fedl2p_grid"],
        "per_language": language_records(units, facts["language_budgets"]),
        "structure": facts["structure"], "psg_training": facts["psg_training"], "privacy": facts["privacy"],
        "against_reference": facts["reference"],
        "selection": facts["selection"].get("chosen") if facts["selection"] else None,
        "communication": {"stages": {name: traffic.record() for name, traffic in facts["traffic"].items()},
                          "adapters": facts["adapters"]},
        "other_metrics": {name: {"summary": [{"pool": p, "method": m, "budget": b, **entry}
                                             for (p, m, b), entry in extra["summary"].items()],
                                 "comparisons": extra["comparisons"]} for name, extra in secondary.items()},
    }), indent=1))
    (run_dir / "report.md").write_text(
        report_markdown(shown, run_dir, records, stage_seconds, command, summary, units, facts))
    print_main_table(summary, shown, label)
    if facts["budget"]:
        print_budget_verdict(facts["budget"])


def write_bases_report(config: dict, run_dir: Path, records_by_base: Mapping[str, list[dict]], command: str,
                       rewritten_by: str | None = None) -> None:
    """report.md and results.json of a run over several base models (FedAvg and personalized-FL bases): per base
    its main table and FedP²EFT minus every other method, and on top FedP²EFT minus the best baseline per base and
    budget. Each base's own folder holds its full report."""
    sections, gaps, per_base = [], {}, {}
    for base, records in records_by_base.items():
        metric_name = row_metrics(records)[0]
        label = METRIC_LABELS.get(metric_name, metric_name)
        produced = {row["method"] for record in records for row in record["rows"]} - {"base"}
        shown = {**config, "name": base, "methods": method_order(set(config["methods"]) | produced)}
        units, summary = client_units(records, metric_name), summarize(records, metric_name=metric_name)
        pools, budgets, methods = _pools(shown, units), _budgets(shown, units), _table_methods(shown, units)
        comparisons = compare(units, pools, budgets, methods)
        gaps[base] = {pool: best_baseline_gaps(summary, comparisons, pool, budgets) for pool in pools}
        per_base[base] = {"comparisons": comparisons,
                          "summary": [{"pool": p, "method": m, "budget": b, **entry}
                                      for (p, m, b), entry in summary.items()]}
        effects = budget_effects(units, summary, pools, budgets, methods)
        per_base[base]["budget_effects"] = effects
        sections += [f"## Base: {base}\n", f"Full report: [{base}/report.md]({base}/report.md)\n",
                     main_table_markdown(summary, shown, label), "",
                     comparison_markdown(comparisons, shown, summary), "", verdict(comparisons, summary), "",
                     *([budget_verdict(effects), ""] if effects else [])]
    budgets = sorted({b for pools in gaps.values() for by_budget in pools.values() for b in by_budget})
    lines = ["| base | pool | " + " | ".join(f"r={b}" for b in budgets) + " |", "|---|---|" + "---|" * len(budgets)]
    for base, pools in gaps.items():
        for pool, by_budget in pools.items():
            cells = ["–" if (c := by_budget.get(b)) is None else
                     f"{_signed(c['difference'])} [{_signed(c['ci_low'])}, {_signed(c['ci_high'])}] vs {c['method']} "
                     f"{c['outcome']}" for b in budgets]
            lines.append(f"| {base} | {pool} | " + " | ".join(cells) + " |")
    header = [f"# FedP²EFT on several base models: `{config['name']}`\n", f"Command: `{command}`\n",
              *([rewritten_note(rewritten_by)] if rewritten_by else []),
              "Every base model is trained on the seen pool, and every method personalizes each seen client on top "
              "of that client's base: the shared model for FedAvg, the client's own personal base for a "
              "personalized-FL algorithm (FedDPA-T: global model plus the client's local LoRA; FedSA-LoRA: "
              "global model plus the client's own B matrices times the shared A; DEPT: global body plus the "
              "client's own embeddings; docs/method.md, \"Personalized-FL bases\"). Percentage points, "
              "paired 95% client-bootstrap intervals; win = the interval lies above zero.\n",
              "## FedP²EFT minus the best baseline\n", "\n".join(lines), ""]
    (Path(run_dir) / "report.md").write_text("\n".join(header + sections) + "\n")
    (Path(run_dir) / "results.json").write_text(json.dumps(_jsonable({"config": config, "command": command,
                                                                      "bases": per_base}), indent=1))
