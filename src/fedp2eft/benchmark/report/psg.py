"""The PS generator's training curves: read from its metrics.jsonl, and whether (and by which round) each curve
flattened."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedp2eft.benchmark.communication import read_rounds
from fedp2eft.benchmark.report.formatting import _percent

FLAT_TOLERANCE = 0.05
FLAT_MIN_FRACTION = 0.25
PSG_CURVES = {"train/stage1_loss": "stage-1 loss", "train/mean_lambda": "mean λ", "train/l1_before": "L1 before"}


def flattening_round(rounds: Sequence[int], values: Sequence[float], tolerance: float = FLAT_TOLERANCE,
                     min_fraction: float = FLAT_MIN_FRACTION) -> int | None:
    """First round from which every later value stays within ±``tolerance`` of the final value; None when the
    curve has not flattened. Every curve is within 5% of its end for its last few rounds, even a steadily rising
    one, so a stable stretch shorter than ``min_fraction`` of the rounds (and than two rounds) does not count."""
    curve = np.asarray(values, dtype=float)
    if curve.size < 2 or not np.isfinite(curve[-1]):
        return None
    final = curve[-1]
    band = tolerance * (abs(final) if final != 0 else np.nanmax(np.abs(curve)))
    outside = np.flatnonzero(~(np.abs(curve - final) <= band))
    start = int(outside[-1]) + 1 if outside.size else 0
    needed = max(2, math.ceil(min_fraction * curve.size))
    return int(rounds[start]) if curve.size - start >= needed else None


def load_psg_metrics(run_dir: Path) -> dict[str, list[dict]]:
    """Label -> rounds of the PS-generator training log: one ``seed*/psg/metrics.jsonl`` per seed, or the single
    ``psg/metrics.jsonl`` of a one-generator run. A torn last line (an interrupted run) is skipped."""
    files = sorted(run_dir.glob("seed*/psg/metrics.jsonl"),
                   key=lambda p: (int(re.sub(r"\D", "", p.parent.parent.name) or 0), p.parent.parent.name))
    labels = [p.parent.parent.name for p in files]
    if not files and (run_dir / "psg" / "metrics.jsonl").is_file():
        files, labels = [run_dir / "psg" / "metrics.jsonl"], ["run"]
    return {label: rows for label, path in zip(labels, files) if (rows := read_rounds(path))}


def relative_growth(values: Sequence[float], quarter: int) -> float | None:
    """Least-squares slope per round over one quarter of the curve (0 = first), as a fraction of the final value:
    how fast a curve still moves, which says more than a yes/no flattening test when it is slowing down."""
    curve = np.asarray(values, dtype=float)
    size = curve.size // 4
    if size < 2 or curve[-1] == 0:
        return None
    part = curve[quarter * size: (quarter + 1) * size if quarter < 3 else curve.size]
    slope = np.polyfit(np.arange(part.size), part, 1)[0]
    return float(slope / abs(curve[-1]))


def psg_flattening(logs: Mapping[str, list[dict]]) -> list[dict]:
    """Per seed: rounds logged, final value and flattening round of each training curve present."""
    out = []
    for label, rows in logs.items():
        entry = {"seed": label, "rounds": len(rows)}
        for key in PSG_CURVES:
            points = [(r["round"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                rounds, values = zip(*points)
                entry[key] = {"final": float(values[-1]), "flattened_at": flattening_round(rounds, values),
                              "rounds": len(points), "growth_second_quarter": relative_growth(values, 1),
                              "growth_last_quarter": relative_growth(values, 3)}
        out.append(entry)
    return out


def psg_markdown(flattening: list[dict]) -> str:
    """Per seed: final values and the round by which each curve flattened (or an honest 'did not flatten')."""
    keys = [k for k in ("train/mean_lambda", "train/stage1_loss") if any(k in e for e in flattening)]
    if not keys:
        return ""
    lines = ["| seed | rounds | " + " | ".join(f"final {PSG_CURVES[k]} | {PSG_CURVES[k]} flattened by | "
                                               f"{PSG_CURVES[k]} change per round, 2nd → last quarter"
                                               for k in keys) + " |",
             "|---|---|" + "---|---|---|" * len(keys)]
    for entry in flattening:
        cells = []
        for key in keys:
            curve = entry.get(key)
            if curve is None:
                cells += ["–", "–", "–"]
                continue
            flat = curve["flattened_at"]
            cells += [f"{curve['final']:.4g}",
                      f"round {flat}" if flat is not None else f"did not flatten within {curve['rounds']} rounds",
                      f"{_percent(curve.get('growth_second_quarter'))} → {_percent(curve.get('growth_last_quarter'))}"]
        lines.append(f"| {entry['seed']} | {entry['rounds']} | " + " | ".join(cells) + " |")
    rule = (f"A curve has flattened at the first round from which every later round stays within "
            f"±{100 * FLAT_TOLERANCE:.0f}% of its final value; a stable stretch shorter than "
            f"{100 * FLAT_MIN_FRACTION:.0f}% of the rounds does not count (any curve is near its end at the end). "
            "The change per round is the least-squares slope over that quarter of the rounds, in % of the final "
            "value: a curve that is slowing down shows it there even before it passes the flattening test.")
    return "\n".join(lines) + "\n\n" + rule + "\n\n" + " ".join(_flattening_sentence(flattening, k) for k in keys)


def _flattening_sentence(flattening: list[dict], key: str) -> str:
    """E.g. 'mean λ flattened in 1 of 2 seed(s) (by round 6 in seed0); it did not flatten within 20 rounds in
    seed1.' - one line per curve, so a curve still moving in any seed is said plainly."""
    curves = [(entry["seed"], entry[key]) for entry in flattening if key in entry]
    done = [(seed, c["flattened_at"]) for seed, c in curves if c["flattened_at"] is not None]
    open_ = [(seed, c["rounds"]) for seed, c in curves if c["flattened_at"] is None]
    text = f"**{PSG_CURVES[key]}** flattened in {len(done)} of {len(curves)} seed(s)"
    if done:
        text += " (by round " + ", ".join(f"{r} in {seed}" for seed, r in done) + ")"
    if open_:
        text += "; it did not flatten within " + ", ".join(f"{n} rounds in {seed}" for seed, n in open_)
    return text + "."
