"""What FedL2P's meta-nets made of the clients' learning rates, and whether they moved them at all."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

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
