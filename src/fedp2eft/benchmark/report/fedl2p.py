"""What FedL2P's meta-nets made of the clients' learning rates, whether they moved them at all, and, for a stage
trained once per meta learning rate of the grid, what each rate did to the validation loss it trains on."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from fedp2eft.benchmark.communication import read_rounds
from fedp2eft.core.methods import grid_point_folders

MULTIPLIER_FLAT = 0.01  # a FedL2P multiplier within 1 ± 1% leaves a tensor's rate where the meta-net started it


def fedl2p_rates(records: list[dict]) -> list[dict]:
    """Per pool and budget, what FedL2P's meta-nets made of the clients' learning rates: the median mean rate, the
    smallest and largest multiplier any run got, and how many runs kept every multiplier within 1 ± 1% (those
    fine-tune as uniform LoRA at the meta-nets' base rates). Empty for runs made before rows carried them."""
    rows: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for record in records:
        for row in record["rows"]:
            if row["method"] == "fedl2p" and "multiplier_min" in row:
                rows[(record["pool"], row["budget"])].append(row)
    return [{"pool": pool, "budget": budget, "runs": len(found),
             "mean_lr": float(np.median([row["mean_lr"] for row in found])),
             "multiplier_min": min(row["multiplier_min"] for row in found),
             "multiplier_max": max(row["multiplier_max"] for row in found),
             "flat": sum(abs(row["multiplier_min"] - 1) <= MULTIPLIER_FLAT
                         and abs(row["multiplier_max"] - 1) <= MULTIPLIER_FLAT for row in found)}
            for (pool, budget), found in sorted(rows.items())]


def fedl2p_markdown(entries: list[dict]) -> str:
    lines = ["| pool | r | runs | median mean learning rate | smallest multiplier | largest multiplier | runs with "
             "every multiplier within 1 ± 1% |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {e['pool']} | {e['budget']} | {e['runs']} | {e['mean_lr']:.3g} | {e['multiplier_min']:.4f} | "
              f"{e['multiplier_max']:.4f} | {e['flat']} |" for e in entries]
    flat, runs = sum(e["flat"] for e in entries), sum(e["runs"] for e in entries)
    if flat == runs:
        verdict_line = (f"In all {runs} runs every multiplier lies within 1 ± 1%: the meta-nets did not move the "
                        "rates, so FedL2P fine-tuned as uniform LoRA at its base rates and its scores repeat "
                        "LoRA's at that rate. This run cannot show what learned learning rates are worth.")
    else:
        verdict_line = (f"In {runs - flat} of {runs} runs some multiplier leaves 1 ± 1%: the meta-nets gave those "
                        "clients learning rates of their own.")
    return "\n".join(lines) + "\n\n" + verdict_line + "\n"


def fedl2p_grid(run_dir: Path) -> list[dict]:
    """Per seed and grid point of a FedL2P stage trained once per meta learning rate (``select_on_grid``), from its
    ``metrics.jsonl``: each round's validation loss after fine-tuning with the meta-nets the round started from
    (mean over the round's clients and budgets; a round samples the same clients at every point, so a column
    compares meta learning rates on the same clients), the mean multiplier the round's client updates reached,
    and the meta-nets the stage's early stopping kept (after round k; 0 = the untrained ones). Empty for a stage
    trained once, and without the stage's logs."""
    entries = []
    for seed_dir in sorted(Path(run_dir).glob("seed*")):
        for point, folder in grid_point_folders(seed_dir / "fedl2p").items():
            if not (folder / "metrics.jsonl").is_file():  # a copy of the run without its stage logs
                continue
            rows = [row for row in read_rounds(folder / "metrics.jsonl") if "train/val_loss_before" in row]
            if not rows:
                continue
            losses = [row["train/val_loss_before"] for row in rows]
            entries.append({"seed": int(seed_dir.name.removeprefix("seed")), "point": point, "losses": losses,
                            "multipliers": [row["train/mean_multiplier"] for row in rows],
                            "kept_after": losses.index(min(losses))})
    return entries


def fedl2p_grid_markdown(entries: list[dict]) -> str:
    """The table of ``fedl2p_grid`` and what it says: whether larger meta learning rates lowered the loss FedL2P
    trains on, and whether early stopping kept trained meta-nets at all."""
    rounds = max(len(e["losses"]) for e in entries)
    head = "| seed | meta lr | " + " | ".join(f"round {r + 1}" for r in range(rounds)) + " | kept |"
    lines = [head, "|---|---|" + "---|" * rounds + "---|"]
    for e in entries:
        cells = [f"{loss:.3f} (x{multiplier:.2f})" for loss, multiplier in zip(e["losses"], e["multipliers"])]
        kept = "untrained" if e["kept_after"] == 0 else f"after round {e['kept_after']}"
        lines.append(f"| {e['seed']} | x{e['point']:g} | " + " | ".join(cells + ["–"] * (rounds - len(cells)))
                     + f" | {kept} |")
    untrained = sum(e["kept_after"] == 0 for e in entries)
    note = (f"Early stopping kept the untrained meta-nets (every multiplier 1: uniform LoRA at its base rates) at "
            f"{untrained} of {len(entries)} grid points: their meta-steps never lowered the validation loss below "
            "the first round's." if untrained else
            "Early stopping kept trained meta-nets at every grid point.")
    return ("Validation loss after fine-tuning with the meta-nets each round starts from (mean multiplier the "
            "round's client updates reached in brackets; a round's clients are the same at every meta learning "
            "rate, so a column compares rates on the same clients), and the meta-nets early stopping kept.\n\n"
            + "\n".join(lines) + "\n\n" + note + "\n")
