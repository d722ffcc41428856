"""The text of report.md: its header, how the numbers are computed, and every section in order; a section whose
inputs are missing is left out."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedp2eft.benchmark.communication import communication_markdown
from fedp2eft.benchmark.report.budget import budget_markdown, budget_verdict
from fedp2eft.benchmark.report.fedl2p import fedl2p_grid_markdown, fedl2p_markdown
from fedp2eft.benchmark.report.formatting import _title
from fedp2eft.benchmark.report.privacy import privacy_markdown
from fedp2eft.benchmark.report.psg import psg_markdown
from fedp2eft.benchmark.report.rank_maps import structure_markdown
from fedp2eft.benchmark.report.records import METRIC_LABELS, Setting, Units, _budgets, _pools
from fedp2eft.benchmark.report.reference import reference_markdown
from fedp2eft.benchmark.report.selection import selection_markdown
from fedp2eft.benchmark.report.stats import BOOTSTRAP_SEED, RESAMPLES
from fedp2eft.benchmark.report.tables import language_table_markdown, main_table_markdown, per_language_note
from fedp2eft.benchmark.report.verdicts import best_baseline_markdown, comparison_markdown, verdict

GENERATION_NOTE = ("Generations are greedy, up to `generation_tokens` new tokens, stopped at end-of-sequence. ROUGE-L F1 "
                   "is computed on the model's own tokenizer tokens (so scripts without spaces, e.g. Chinese and "
                   "Thai, are scored per subword); it is not comparable with rouge-score's default English "
                   "tokenization, which drops non-Latin characters. Exact match compares the decoded generation "
                   "with the reference after collapsing whitespace.")


def _statistics_note(records: list[dict], metrics: Sequence[str] = ("accuracy",)) -> str:
    """How the numbers are made, with the caveats this run's shape calls for."""
    seeds = sorted({r["seed"] for r in records})
    clients_per_language = Counter((pool, language) for pool, _, language in
                                   {(r["pool"], r["client"], r["language"]) for r in records})
    if metrics[0] == "accuracy":
        how = "Accuracy is pooled per language (sum correct / sum count over its clients)"
    else:
        how = (f"{', '.join(METRIC_LABELS.get(m, m) for m in metrics)} are pooled per language (sum of per-example "
               "scores / examples over its clients; next-token accuracy per response token)")
    if "rouge_l" in metrics:
        how = (GENERATION_NOTE + " " + how)
    note = (f"{how}, averaged over languages, "
            f"then over {len(seeds)} seed(s). Intervals are 95% percentile intervals of a bootstrap ({RESAMPLES} "
            f"resamples, numpy seed {BOOTSTRAP_SEED}) over clients, resampled with replacement within each language "
            "so every language stays present; a client carries all its seeds along (they share its data, so they "
            "are not independent draws). Differences are paired: both methods are scored on the same resamples.")
    thin = sorted(f"{pool}/{lang}" for (pool, lang), n in clients_per_language.items() if n < 3)
    if thin:
        note += (f" Fewer than 3 clients in {', '.join(thin)}: the bootstrap cannot see how much clients of those "
                 "languages vary, and the intervals there are too narrow.")
    return note + "\n"


def rewritten_note(command: str) -> str:
    return (f"This report was written again from the run's own records by `{command}`: its tables and verdicts "
            "are this version's, its numbers the run's.\n")


PRECISION_WORDS = {"bf16": "bf16 mixed precision (forward passes under bf16 autocast, float32 weights and optimizer)",
                   "fp32": "float32"}


def report_markdown(config: dict, run_dir: Path, records: list[dict], stage_seconds: dict[str, float], command: str,
                    summary: Mapping[Setting, dict], units: Mapping[Setting, Units], facts: dict) -> str:
    """The text of report.md; sections whose inputs are missing (no generator log, no selection.json) are left
    out rather than shown empty."""
    links = [f"[{name}]({name})" for name in ("config.yaml", "personalize.jsonl", "selection.json")
             if (run_dir / name).exists()] + ["[results.csv](results.csv)", "[results.json](results.json)"]
    budgets = _budgets(config, units)
    comparisons = facts["comparisons"]
    sections = [
        f"# FedP²EFT benchmark: `{config['name']}`\n",
        f"Command: `{command}`\n", *([rewritten_note(facts["rewritten_by"])] if facts["rewritten_by"] else []),
        f"Model `{config['model']}`, dataset `{config['dataset']}`, {len(records)} client runs; methods "
        f"{', '.join(config['methods'])} at budgets {', '.join(map(str, budgets))}; seeds {config.get('seeds')}; "
        f"{PRECISION_WORDS[config.get('precision', 'fp32')]}. "
        f"Wall time {sum(stage_seconds.values()) / 60:.1f} min on {os.cpu_count()} CPU cores ("
        + ", ".join(f"{stage} {seconds / 60:.1f} min" for stage, seconds in stage_seconds.items())
        + "). Files: " + ", ".join(links) + ".\n",
        "## How the numbers are computed\n", _statistics_note(records, facts["metrics"]),
        f"## {_title(facts['label'])} by budget", main_table_markdown(summary, config, facts["label"]),
        f"\n![{facts['label']} vs budget](figures/accuracy_vs_budget.png)\n",
        "## Does FedP²EFT win?\n",
        f"FedP²EFT minus each method in {facts['label']} points, with the 95% paired-bootstrap interval of the "
        "difference (positive = FedP²EFT better; `base` is compared at every budget).\n",
        comparison_markdown(comparisons, config, units), "\n" + verdict(comparisons, summary) + "\n",
        *(["Against the best baseline of each cell (the highest mean among the baselines on these test scores, "
           "so a description of this run, not a selection; own ablations and the base model are not baselines):\n",
           best_baseline_markdown(summary, comparisons, _pools(config, units), budgets) + "\n"]
          if comparisons else []),
        *(["## Does the budget bind?\n",
           f"The largest budget minus the smallest, per method, in {facts['label']} points with the 95% paired "
           "client-bootstrap interval (the same clients at both budgets). When uniform LoRA gains nothing from "
           "more rank, no allocation of rank can beat another, and the comparisons above cannot show what "
           "rank-allocation methods are for.\n", budget_markdown(facts["budget"]),
           "\n" + budget_verdict(facts["budget"]) + "\n"] if facts["budget"] else []),
        "## Per language", per_language_note(units), *(language_table_markdown(units, config, b, facts["label"])
                             for b in facts["language_budgets"]),
    ]
    for name, extra in facts["secondary"].items():
        other = METRIC_LABELS.get(name, name)
        sections += [f"\n## {_title(other)} by budget", main_table_markdown(extra["summary"], config, other),
                     f"\nFedP²EFT minus each method in {other} points (paired, 95% interval):\n",
                     comparison_markdown(extra["comparisons"], config, extra["summary"]),
                     "\n" + verdict(extra["comparisons"], extra["summary"]) + "\n"]
    if facts["structure"]:
        sections += ["\n## Structure the PS generator gives each language\n",
                     "Kept λ: the multipliers FedP²EFT keeps on its ranks. Rank-map overlap(a, b) = "
                     "Σ_m min(r̄_a[m], r̄_b[m]) / Σ_m r̄_a[m] (1 = identical allocation). BT-LoRA (a local search "
                     "per client) is the comparison.\n", structure_markdown(facts["structure"])]
        if facts["has_heatmap"]:
            sections.append(f"\n![rank heatmap, r={facts['heat_budget']}](figures/rank_heatmap.png)\n")
    if facts["fedl2p"]:
        sections += ["\n## FedL2P's learned learning rates\n",
                     "The multipliers the meta-nets gave each run's LoRA tensors (a tensor's rate is its multiplier "
                     "times the meta-net's learned base rate, which starts at LoRA's selected rate).\n",
                     fedl2p_markdown(facts["fedl2p"])]
    if facts.get("fedl2p_grid"):
        sections += ["\n## FedL2P's meta learning rate on the grid\n", fedl2p_grid_markdown(facts["fedl2p_grid"])]
    if facts["has_curve"]:
        sections += ["\n## PS generator training\n", "![psg training](figures/psg_training.png)\n",
                     psg_markdown(facts["psg_training"])]
    if facts["selection"]:
        sections += ["\n## Learning-rate selection\n", selection_markdown(facts["selection"])]
    if facts["traffic"]:
        sections += ["\n## Communication\n", communication_markdown(facts["traffic"], facts["adapters"], "FedP²EFT")]
    if facts["privacy"]:
        sections += ["\n## Privacy\n", privacy_markdown(facts["privacy"])]
    if facts["reference"]:
        sections += ["\n## Against the reference run\n",
                     reference_markdown(facts["reference"], config["report"]["reference_run"], facts["label"])]
    return "\n".join(sections) + "\n"
