"""The report's matplotlib figures: the metric against the budget, the rank heatmap and the PS generator's
training curves. Only this module touches matplotlib, with the Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np

from fedp2eft.benchmark.report.psg import PSG_CURVES, flattening_round
from fedp2eft.benchmark.report.rank_maps import mean_rank_grid
from fedp2eft.benchmark.report.records import Setting, _budgets, _pools, _table_methods

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

MARKERS = "osD^vP*Xh"
PSG_AXES = {"train/stage1_loss": "BayesTune loss after stage 1 (client mean)",
            "train/mean_lambda": "mean λ the generator outputs",
            "train/l1_before": "L1(generator output, learned λ) before stage 2"}


def _finish_axis(axis) -> None:
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_accuracy(summary: Mapping[Setting, dict], config: dict, path: Path, label: str = "accuracy") -> None:
    """The main metric vs budget per method, error bars = the 95% client-bootstrap interval; base as a shaded band."""
    pools, budgets = _pools(config, summary), _budgets(config, summary)
    figure, axes = plt.subplots(1, len(pools), figsize=(5.5 * len(pools), 4), squeeze=False)
    methods = _table_methods(config, summary)
    for axis, pool in zip(axes[0], pools):
        for index, method in enumerate(methods):
            points = [(b, summary[(pool, method, b)]) for b in budgets if (pool, method, b) in summary]
            if not points and (pool, method, 0) in summary:
                entry = summary[(pool, method, 0)]
                line = axis.axhline(100 * entry["mean"], color="grey", ls="--", label=method)
                axis.axhspan(100 * entry["ci_low"], 100 * entry["ci_high"], color=line.get_color(), alpha=0.15)
                continue
            if not points:
                continue
            # each method a little to the side and with its own marker, so tied methods do not hide each other
            dodge = 2 ** (0.04 * (index - (len(methods) - 1) / 2))
            xs = [b * dodge for b, _ in points]
            means = np.array([e["mean"] for _, e in points]) * 100
            errors = np.array([[e["mean"] - e["ci_low"], e["ci_high"] - e["mean"]] for _, e in points]).T * 100
            axis.errorbar(xs, means, yerr=np.clip(errors, 0, None), marker=MARKERS[index % len(MARKERS)], capsize=3,
                          label=method, alpha=0.85)
        axis.set_xscale("log", base=2)
        axis.set_xticks(budgets, [str(b) for b in budgets])
        axis.set_xlabel("rank budget r (average rank per module)")
        axis.set_ylabel(f"{label} (%)")
        axis.set_title(f"{pool} clients (95% client-bootstrap intervals)")
        _finish_axis(axis)
    _save(figure, path)


def plot_rank_heatmap(records: list[dict], budget: int, path: Path) -> bool:
    """Average rank the PS generator gives each module, per language (fedp2eft rows at ``budget``), every
    language of the run."""
    found = mean_rank_grid(records, budget)
    if found is None:
        return False
    languages, ordered, grid = found
    figure, axis = plt.subplots(figsize=(max(6, 0.18 * len(ordered)), 0.5 * len(languages) + 2))
    image = axis.imshow(grid, aspect="auto", cmap="viridis")
    axis.set_yticks(range(len(languages)), languages)
    axis.set_xticks(range(len(ordered)), [_short(m) for m in ordered], rotation=90, fontsize=6)
    axis.set_title(f"ranks the PS generator gives each module (r={budget}, mean over a language's clients)")
    axis.set_xlabel("module (block . sub-layer)")
    axis.set_ylabel("language")
    figure.colorbar(image, ax=axis, label="rank")
    _save(figure, path)
    return True


def _short(name: str) -> str:
    """The part of a module name from the block index on, e.g. '3.attention.self.query'."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), 0)
    return ".".join(parts[index:])


def plot_psg_training(logs: Mapping[str, list[dict]], path: Path) -> bool:
    """One panel per curve (stage-1 loss, mean λ, and L1 before when logged), one line per seed, with a dotted
    line at the round where that seed's curve flattened."""
    keys = [k for k in PSG_CURVES if any(k in r for rows in logs.values() for r in rows)]
    if not keys:
        return False
    figure, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for index, (label, rows) in enumerate(logs.items()):
            points = [(r["round"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if not points:
                continue
            rounds, values = zip(*points)
            color = f"C{index % 10}"
            axis.plot(rounds, values, marker=".", color=color, label=label)
            flat = flattening_round(rounds, values)
            if flat is not None:
                axis.axvline(flat, color=color, ls=":", alpha=0.7)
        axis.set_xlabel("federated round")
        axis.set_ylabel(PSG_AXES[key])
        axis.set_title(PSG_CURVES[key])
        _finish_axis(axis)
    figure.suptitle("PS-generator training: one line per seed; dotted = the round its curve flattened", fontsize=10)
    _save(figure, path)
    return True
