"""Tables and figures from ``personalize.jsonl``: accuracy pooled per language, then averaged over languages;
mean +- std over seeds. Everything in the report is computed here from the run's own files."""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

METHOD_ORDER = ["base", "lora", "adalora", "btlora", "fedp2eft"]


def per_language(records: list[dict]) -> dict[tuple, float]:
    """(seed, pool, method, budget, language) -> pooled accuracy (sum correct / sum count)."""
    correct: dict[tuple, int] = defaultdict(int)
    count: dict[tuple, int] = defaultdict(int)
    for record in records:
        for row in record["rows"]:
            key = (record["seed"], record["pool"], row["method"], row["budget"], record["language"])
            correct[key] += row["correct"]
            count[key] += row["count"]
    return {key: correct[key] / count[key] for key in count}


def summarize(language_scores: dict[tuple, float]) -> dict[tuple, tuple[float, float, int]]:
    """(pool, method, budget) -> (mean, std over seeds, number of seeds) of the language-averaged accuracy."""
    by_seed: dict[tuple, list[float]] = defaultdict(list)
    for (seed, pool, method, budget, _), score in language_scores.items():
        by_seed[(seed, pool, method, budget)].append(score)
    per_setting: dict[tuple, list[float]] = defaultdict(list)
    for (_seed, pool, method, budget), scores in sorted(by_seed.items()):
        per_setting[(pool, method, budget)].append(sum(scores) / len(scores))
    return {key: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
            for key, v in per_setting.items()}


def _methods(keys) -> list[str]:
    present = {key[1] for key in keys}
    return [m for m in METHOD_ORDER if m in present]


def main_table_markdown(summary: dict, config: dict) -> str:
    lines = []
    for pool in config["pools"]:
        lines += [f"\n**{pool} clients** (accuracy %, languages averaged; mean ± std over "
                  f"{len(config['seeds'])} seed(s)); `base` = no personalization\n",
                  "| method | " + " | ".join(f"r={b}" for b in config["budgets"]) + " |",
                  "|---|" + "---|" * len(config["budgets"])]
        base = summary.get((pool, "base", 0))
        best = {budget: max((summary[key][0] for key in summary
                             if key[0] == pool and key[1] != "base" and key[2] == budget), default=None)
                for budget in config["budgets"]}
        for method in _methods(summary):
            if method == "base":
                lines.append("| base | " + " | ".join(_cell(base) for _ in config["budgets"]) + " |")
                continue
            cells = []
            for budget in config["budgets"]:
                value = summary.get((pool, method, budget))
                cell = _cell(value)
                cells.append(f"**{cell}**" if value and value[0] == best[budget] else cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "–"
    mean, std, seeds = value
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if seeds > 1 else f"{100 * mean:.1f}"


def language_table_markdown(language_scores: dict, config: dict, budget: int) -> str:
    languages = sorted({key[4] for key in language_scores})
    methods = [m for m in METHOD_ORDER if any(k[2] == m for k in language_scores)]
    lines = []
    for pool in config["pools"]:
        lines += [f"\n**{pool} clients, r={budget}** (accuracy %, mean over seeds)\n",
                  "| language | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for language in languages:
            cells = []
            for method in methods:
                b = 0 if method == "base" else budget
                values = [s for (seed, p, m, bb, lang), s in language_scores.items()
                          if p == pool and m == method and bb == b and lang == language]
                cells.append(f"{100 * statistics.mean(values):.1f}" if values else "–")
            lines.append(f"| {language} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy(summary: dict, config: dict, path: Path) -> None:
    pools = config["pools"]
    figure, axes = plt.subplots(1, len(pools), figsize=(5.5 * len(pools), 4), squeeze=False)
    for axis, pool in zip(axes[0], pools):
        for method in _methods(summary):
            if method == "base":
                if (pool, "base", 0) in summary:
                    axis.axhline(100 * summary[(pool, "base", 0)][0], color="grey", ls="--", label="base")
                continue
            budgets = [b for b in config["budgets"] if (pool, method, b) in summary]
            means = np.array([summary[(pool, method, b)][0] for b in budgets]) * 100
            stds = np.array([summary[(pool, method, b)][1] for b in budgets]) * 100
            axis.errorbar(budgets, means, yerr=stds, marker="o", capsize=3, label=method)
        axis.set_xscale("log", base=2)
        axis.set_xticks(config["budgets"], [str(b) for b in config["budgets"]])
        axis.set_xlabel("rank budget r (average rank per module)")
        axis.set_ylabel("accuracy (%)")
        axis.set_title(f"{pool} clients")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_rank_heatmap(records: list[dict], budget: int, path: Path, max_languages: int = 8) -> bool:
    """Average rank the PS generator gives each module, per language (fedp2eft rows at ``budget``)."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    modules: list[str] = []
    for record in records:
        for row in record["rows"]:
            if row["method"] == "fedp2eft" and row["budget"] == budget and "ranks" in row:
                counts[record["language"]] += 1
                for name, rank in row["ranks"].items():
                    sums[record["language"]][name] += rank
                    if name not in modules:
                        modules.append(name)
    if not counts:
        return False
    languages = sorted(counts)[:max_languages]
    modules.sort(key=_module_order)
    grid = np.array([[sums[lang][m] / counts[lang] for m in modules] for lang in languages])
    figure, axis = plt.subplots(figsize=(max(6, 0.18 * len(modules)), 0.5 * len(languages) + 2))
    image = axis.imshow(grid, aspect="auto", cmap="viridis")
    axis.set_yticks(range(len(languages)), languages)
    axis.set_xticks(range(len(modules)), [_short(m) for m in modules], rotation=90, fontsize=6)
    axis.set_title(f"ranks given by the PS generator per module (r={budget}, mean over clients)")
    figure.colorbar(image, ax=axis, label="rank")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _module_order(name: str) -> tuple:
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    return (numbers or [0], name)


def _short(name: str) -> str:
    """The part of a module name from the block index on, e.g. '3.attention.self.query'."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), 0)
    return ".".join(parts[index:])


def plot_psg_training(metrics_file: Path, path: Path) -> bool:
    if not metrics_file.exists():
        return False
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    keys = [k for k in ("train/stage1_loss", "train/l1_before", "train/mean_lambda") if rows and k in rows[0]]
    if not keys:
        return False
    figure, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for axis, key in zip(axes[0], keys):
        axis.plot([r["round"] for r in rows], [r[key] for r in rows], marker=".")
        axis.set_xlabel("round")
        axis.set_title(key.removeprefix("train/"))
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(config: dict, run_dir: Path, records: list[dict], generator: Path | None, base_model: str,
                 stage_seconds: dict[str, float], command: str) -> None:
    language_scores = per_language(records)
    summary = summarize(language_scores)
    figures = run_dir / "figures"
    figures.mkdir(exist_ok=True)
    plot_accuracy(summary, config, figures / "accuracy_vs_budget.png")
    heat_budget = 8 if 8 in config["budgets"] else config["budgets"][-1]
    has_heatmap = plot_rank_heatmap(records, heat_budget, figures / "rank_heatmap.png")
    has_curve = plot_psg_training(run_dir / "psg" / "metrics.jsonl", figures / "psg_training.png")

    with (run_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seed", "pool", "method", "budget", "language", "accuracy"])
        for key, score in sorted(language_scores.items()):
            writer.writerow([*key, f"{score:.6f}"])
    (run_dir / "results.json").write_text(json.dumps({
        "config": config, "stage_seconds": stage_seconds, "command": command, "base_model": base_model,
        "generator": str(generator) if generator else None,
        "summary": [{"pool": p, "method": m, "budget": b, "mean": mean, "std": std, "seeds": n}
                    for (p, m, b), (mean, std, n) in sorted(summary.items())],
    }, indent=1))

    findings = compare(summary, config)
    sections = [
        f"# FedP²EFT benchmark: `{config['name']}`\n",
        f"Command: `{command}`\n",
        f"Model `{config['model']}`, dataset `{config['dataset']}`, {len(records)} client runs "
        f"({len(config['methods'])} methods x {len(config['budgets'])} budgets each). Wall time "
        f"{sum(stage_seconds.values()) / 60:.1f} min on {os.cpu_count()} CPU cores ("
        + ", ".join(f"{stage} {seconds / 60:.1f} min" for stage, seconds in stage_seconds.items())
        + "). Resolved config: [config.yaml](config.yaml); raw rows: [personalize.jsonl](personalize.jsonl), "
        "[results.csv](results.csv), [results.json](results.json).\n",
        "## Accuracy by budget", main_table_markdown(summary, config),
        "\n![accuracy vs budget](figures/accuracy_vs_budget.png)\n",
        "## Does FedP²EFT win?\n", findings + "\n",
        "## Per language", *(language_table_markdown(language_scores, config, budget)
                             for budget in sorted({min(config["budgets"]), heat_budget})),
    ]
    if has_heatmap:
        sections.append(f"\n## Structure the PS generator gives each language (r={heat_budget})\n\n"
                        "![rank heatmap](figures/rank_heatmap.png)\n")
    if has_curve:
        sections.append("\n## PS generator training\n\n![psg training](figures/psg_training.png)\n")
    (run_dir / "report.md").write_text("\n".join(sections))
    print_main_table(summary, config)


def compare(summary: dict, config: dict) -> str:
    """FedP²EFT minus each baseline, in accuracy points, per pool and budget; and a one-line verdict."""
    baselines = [m for m in _methods(summary) if m != "fedp2eft"]
    settings = [(p, b) for p in config["pools"] for b in config["budgets"] if (p, "fedp2eft", b) in summary]
    if not settings:
        return "FedP²EFT was not part of this run."
    lines = ["| FedP²EFT minus | " + " | ".join(f"{p} r={b}" for p, b in settings) + " |",
             "|---|" + "---|" * len(settings)]
    wins = total = 0
    for method in baselines:
        cells = []
        for pool, budget in settings:
            theirs = summary.get((pool, method, 0 if method == "base" else budget))
            if theirs is None:
                cells.append("–")
                continue
            delta = 100 * (summary[(pool, "fedp2eft", budget)][0] - theirs[0])
            wins += delta > 0
            total += 1
            cells.append(f"{delta:+.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    verdict = (f"\n\nFedP²EFT is ahead in {wins} of {total} comparisons (positive = FedP²EFT better). "
               + ("It does not beat every baseline everywhere; docs/discussion.md discusses why."
                  if wins < total else "It beats every baseline in every setting of this run."))
    return "\n".join(lines) + verdict


def print_main_table(summary: dict, config: dict) -> None:
    console = Console()
    for pool in config["pools"]:
        table = Table(title=f"{config['name']}: {pool} clients, accuracy % (languages averaged)")
        table.add_column("method")
        for budget in config["budgets"]:
            table.add_column(f"r={budget}", justify="right")
        for method in _methods(summary):
            budgets = [0] * len(config["budgets"]) if method == "base" else config["budgets"]
            table.add_row(method, *(_cell(summary.get((pool, method, b))) for b in budgets))
        console.print(table)
