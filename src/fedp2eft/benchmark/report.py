"""The benchmark report: every table, figure and sentence of ``report.md`` is computed here from the run's own
records and files (nothing is typed in by hand), so the report can be regenerated and audited.

How the statistics work (the method being measured is described in docs/method.md):

* The metric is the paper's: accuracy pooled per language (sum correct / sum count over that language's
  clients), averaged over languages, then averaged over seeds. Instruction tasks pool ROUGE-L F1 and exact match
  of the greedy generations the same way (sum of per-example scores / examples), or next-token accuracy when no
  generations were scored; every row records each metric as [sum, count].
* Its uncertainty comes from the clients. A stratified bootstrap resamples clients with replacement inside each
  language, so every language stays present and the metric stays defined; a client carries all its seeds (they
  share its data, so they are not independent draws). The metric is recomputed on each resample and the 95%
  percentile interval is reported.
* FedP²EFT is compared with every other method on the *same* resamples (a paired bootstrap): the variation
  the two methods share (easy and hard clients) cancels, so the interval of the difference is honest and tight.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fedp2eft.benchmark.communication import adapters_shipped, communication_markdown, read_rounds, \
    recorded_traffic, run_traffic  # noqa: E402
from fedp2eft.core.methods import METHODS  # noqa: E402
from fedp2eft.errors import FedP2EFTError  # noqa: E402

KNOWN_METHODS = ["base", *METHODS]  # the registry's order: baselines first, FedP²EFT last
OURS = "fedp2eft"
ABLATIONS = {name for name, spec in METHODS.items() if spec.ablation_of}  # own variants, never baselines
RESAMPLES = 2000
BOOTSTRAP_SEED = 20240601
LEVEL = 0.95
FLAT_TOLERANCE = 0.05
FLAT_MIN_FRACTION = 0.25
METRIC_LABELS = {"accuracy": "accuracy", "rouge_l": "ROUGE-L F1", "exact_match": "exact match",
                 "token_accuracy": "next-token accuracy"}
PSG_CURVES = {"train/stage1_loss": "stage-1 loss", "train/mean_lambda": "mean λ", "train/l1_before": "L1 before"}
MARKERS = "osD^vP*Xh"
PSG_AXES = {"train/stage1_loss": "BayesTune loss after stage 1 (client mean)",
            "train/mean_lambda": "mean λ the generator outputs",
            "train/l1_before": "L1(generator output, learned λ) before stage 2"}

GENERATION_NOTE = ("Generations are greedy, up to `generation_tokens` new tokens, stopped at end-of-sequence. ROUGE-L F1 "
                   "is computed on the model's own tokenizer tokens (so scripts without spaces, e.g. Chinese and "
                   "Thai, are scored per subword); it is not comparable with rouge-score's default English "
                   "tokenization, which drops non-Latin characters. Exact match compares the decoded generation "
                   "with the reference after collapsing whitespace.")
Setting = tuple[str, str, int]          # (pool, method, budget)
Unit = tuple[str, float, int]           # (language, correct or summed score, count)
Units = dict[tuple[int, str], Unit]     # (seed, client) -> unit


# --------------------------------------------------------------------------------------------------- data


def method_order(methods: Iterable[str]) -> list[str]:
    """Registered methods in the registry's order, then every other method that produced rows, sorted: a method
    must show up in the tables rather than vanish because nobody added it to a list."""
    present = set(methods)
    return [m for m in KNOWN_METHODS if m in present] + sorted(present - set(KNOWN_METHODS))


def row_metrics(records: list[dict]) -> list[str]:
    """The metrics the rows carry, the main one first (rows written before metrics were named hold accuracy)."""
    for record in records:
        for row in record["rows"]:
            return list(row.get("scores", {"accuracy": None}))
    return ["accuracy"]


def _pair(row: dict, metric: str | None) -> tuple[float, int]:
    """(sum, count) of ``metric`` in a row; the row's main metric when ``metric`` is None."""
    if metric is None or "scores" not in row:
        return float(row["correct"]), int(row["count"])
    total, count = row["scores"][metric]
    return float(total), int(count)


def client_units(records: list[dict], metric: str | None = None) -> dict[Setting, Units]:
    """(pool, method, budget) -> {(seed, client): (language, correct, count)} of ``metric`` (the main one by
    default). Clients without a test example are left out: they carry no score, and a resample made only of them
    would be 0/0."""
    units: dict[Setting, Units] = defaultdict(dict)
    for record in records:
        for row in record["rows"]:
            total, count = _pair(row, metric)
            if count > 0:
                units[(record["pool"], row["method"], row["budget"])][(record["seed"], record["client"])] = (
                    record["language"], total, count)
    return dict(units)


def per_language(records: list[dict], metric: str | None = None) -> dict[tuple, float]:
    """(seed, pool, method, budget, language) -> ``metric`` pooled over the language's clients (sum / count)."""
    correct: dict[tuple, float] = defaultdict(float)
    count: dict[tuple, int] = defaultdict(int)
    for record in records:
        for row in record["rows"]:
            key = (record["seed"], record["pool"], row["method"], row["budget"], record["language"])
            total, n = _pair(row, metric)
            correct[key] += total
            count[key] += n
    return {key: correct[key] / count[key] for key in count if count[key] > 0}


def _at(table: Mapping[Setting, object], pool: str, method: str, budget: int):
    """The entry of ``method`` at ``budget``; a method without a rank budget (``base``) keeps its rows at budget 0
    and stands in every budget column."""
    if (pool, method, budget) in table:
        return table[(pool, method, budget)]
    return table.get((pool, method, 0))


# ----------------------------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Interval:
    """A point estimate (computed on all units) with its bootstrap percentile interval."""

    mean: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def outcome(self) -> str:
        """For a difference: 'win' when the whole interval lies above zero, 'loss' below zero, else 'tie'."""
        return "win" if self.low > 0 else "loss" if self.high < 0 else "tie"


def _strata(languages: Sequence[str]) -> list[np.ndarray]:
    """Unit indices of each language: the strata of the bootstrap (resampling inside a language keeps every
    language present, so the language average is always defined and always over the same languages)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, language in enumerate(languages):
        groups[language].append(index)
    return [np.array(groups[lang]) for lang in sorted(groups)]


def _arrays(units: Units, keys: Sequence[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([units[k][1] for k in keys], dtype=float), np.array([units[k][2] for k in keys], dtype=float))


def _resampled(groups: list[np.ndarray], arrays: list[tuple[np.ndarray, np.ndarray]], resamples: int,
               seed: int) -> list[np.ndarray]:
    """The metric of every (correct, count) pair on the *same* stratified resamples, one value per resample.
    Sharing the draws is what makes a difference of two methods paired. Within a language a resample pools the
    (seed, client) units it drew; with the same clients in every seed that is the mean over seeds of the
    per-seed pooled accuracy, so the statistic is the metric itself."""
    rng = np.random.default_rng(seed)
    totals = [np.zeros(resamples) for _ in arrays]
    for members in groups:
        draws = members[rng.integers(0, len(members), size=(resamples, len(members)))]
        for total, (correct, count) in zip(totals, arrays):
            total += correct[draws].sum(axis=1) / count[draws].sum(axis=1) / len(groups)
    return totals


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def metric(units: Units) -> float:
    """The paper's metric: accuracy pooled per language (sum correct / sum count), averaged over languages; then
    averaged over seeds."""
    per_seed = []
    for seed in sorted({s for s, _ in units}):
        keys = [k for k in sorted(units) if k[0] == seed]
        correct, count = _arrays(units, keys)
        groups = _strata([units[k][0] for k in keys])
        per_seed.append(np.mean([correct[g].sum() / count[g].sum() for g in groups]))
    return float(np.mean(per_seed))


def by_client(units: Units) -> Units:
    """One unit per client, its seeds pooled. A client appears in every seed (same data, another LoRA init, batch
    order and generator), so its seeds are not independent draws: the bootstrap resamples clients, carrying all
    their seeds along. With equal test counts per seed, pooling equals the mean over seeds."""
    merged: dict[tuple, tuple[str, float, int]] = {}
    for (_, client), (language, correct, count) in units.items():
        _, c, n = merged.get((0, client), (language, 0.0, 0))
        merged[(0, client)] = (language, c + correct, n + count)
    return merged


def bootstrap(units: Units, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> Interval:
    """The metric with the percentile interval of a bootstrap over clients (seeds pooled), stratified by
    language."""
    units = by_client(units)
    keys = sorted(units)
    (values,) = _resampled(_strata([units[k][0] for k in keys]), [_arrays(units, keys)], resamples, seed)
    return Interval(metric(units), *_percentiles(values, level))


def paired_bootstrap(ours: Units, theirs: Units, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = LEVEL) -> Interval | None:
    """``ours`` minus ``theirs`` on the (seed, client) units both have, each resample drawn once and used for
    both; None when they share no unit."""
    ours, theirs = by_client(ours), by_client(theirs)
    keys = sorted(set(ours) & set(theirs))
    if not keys:
        return None
    groups = _strata([ours[k][0] for k in keys])
    a, b = _resampled(groups, [_arrays(ours, keys), _arrays(theirs, keys)], resamples, seed)
    point = metric({k: ours[k] for k in keys}) - metric({k: theirs[k] for k in keys})
    return Interval(point, *_percentiles(a - b, level))


def summarize(records: list[dict], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
              metric_name: str | None = None) -> dict[Setting, dict]:
    """(pool, method, budget) -> mean over seeds, bootstrap interval, number of seeds and clients, and the value
    of each seed (so the seed-to-seed spread stays visible next to the client-level interval)."""
    summary = {}
    for setting, units in sorted(client_units(records, metric_name).items()):
        interval = bootstrap(units, resamples, seed)
        seeds = sorted({s for s, _ in units})
        seed_values = {s: metric({k: u for k, u in units.items() if k[0] == s}) for s in seeds}
        summary[setting] = {"mean": interval.mean, "ci_low": interval.low, "ci_high": interval.high,
                            "seeds": len(seeds), "clients": len(units), "seed_values": seed_values,
                            "seed_std": float(np.std(list(seed_values.values()), ddof=1)) if len(seeds) > 1
                            else 0.0}
    return summary


def compare(units: Mapping[Setting, Units], pools: Sequence[str], budgets: Sequence[int], methods: Sequence[str],
            resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> list[dict]:
    """FedP²EFT minus every other method, paired on the same resampled clients, per pool and budget."""
    comparisons = []
    for method in methods:
        if method == OURS:
            continue
        for pool in pools:
            for budget in budgets:
                difference = paired_difference(units.get((pool, OURS, budget)), _at(units, pool, method, budget),
                                               resamples, seed)
                if difference is not None:
                    comparisons.append({"pool": pool, "budget": budget, "method": method,
                                        "method_budget": budget if (pool, method, budget) in units else 0,
                                        **difference})
    return comparisons


def paired_difference(ours: Units | None, theirs: Units | None, resamples: int = RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> dict | None:
    """``ours`` minus ``theirs`` with its paired interval and outcome, on the clients both have; None when either is
    missing. With one client in a language there is nothing to resample there: no interval, outcome 'untested'."""
    interval = paired_bootstrap(ours, theirs, resamples, seed) if ours and theirs else None
    if interval is None:
        return None
    alone = min(Counter(u[0] for u in by_client(ours).values()).values()) < 2
    return {"difference": interval.mean, "ci_low": interval.low, "ci_high": interval.high,
            "outcome": "untested" if alone else interval.outcome, "clients": len(set(ours) & set(theirs))}


# --------------------------------------------------------------------------------------- does the budget bind?

BUDGET_REFERENCE = "lora"  # uniform LoRA: its gain from more rank is what any allocation has to work with


def budget_effects(units: Mapping[Setting, Units], summary: Mapping[Setting, dict], pools: Sequence[str],
                   budgets: Sequence[int], methods: Sequence[str], resamples: int = RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> list[dict]:
    """Per pool, what the largest budget buys over the smallest, paired on the same resampled clients: for every
    method with a rank budget, and for the best method per budget (``best``: the column's highest mean at each end,
    chosen on these test scores, so descriptive; ``base`` excluded)."""
    if len(budgets) < 2:
        return []
    low, high = min(budgets), max(budgets)
    effects = []
    for pool in pools:
        ranked = [m for m in methods if m != "base" and (pool, m, low) in units and (pool, m, high) in units]
        for method in ranked:
            difference = paired_difference(units[(pool, method, high)], units[(pool, method, low)], resamples, seed)
            if difference is not None:
                effects.append({"pool": pool, "method": method, "low": low, "high": high, **difference})
        if ranked:
            best = {b: max(ranked, key=lambda m: summary[(pool, m, b)]["mean"]) for b in (low, high)}
            difference = paired_difference(units[(pool, best[high], high)], units[(pool, best[low], low)],
                                           resamples, seed)
            if difference is not None:
                effects.append({"pool": pool, "method": "best", "low": low, "high": high, "best_low": best[low],
                                "best_high": best[high], **difference})
    return effects


def _effect_text(effect: dict) -> str:
    return (f"{_signed(effect['difference'])} points [{_signed(effect['ci_low'])}, {_signed(effect['ci_high'])}] "
            f"from r={effect['low']} to r={effect['high']}")


def budget_verdict(effects: list[dict]) -> str:
    """Plain sentences, one per pool: does more budget buy anything here, by uniform LoRA's gain (the best method
    per budget's when uniform LoRA did not run), with the best method per budget as the second witness, and what
    follows for choosing a budget and for comparing allocations."""
    sentences = []
    for pool in dict.fromkeys(e["pool"] for e in effects):
        own = {e["method"]: e for e in effects if e["pool"] == pool}
        best = own.get("best")
        reference = own.get(BUDGET_REFERENCE) or best
        if reference is None:
            continue
        who = "uniform LoRA" if reference is not best else "the best method per budget"
        gain = f"{who} changes by {_effect_text(reference)}"
        cheapest = f"pick the cheapest budget (r={reference['low']})"
        same = best is None or best is reference or best["best_low"] == best["best_high"] == reference["method"]
        envelope = "" if same else (
            f" The best method per budget ({best['best_low']} at r={best['low']}, {best['best_high']} at "
            f"r={best['high']}; picked on these test scores, so an optimistic figure) changes by "
            f"{_effect_text(best)}.")
        if reference["outcome"] == "untested":
            sentences.append(f"**{pool} clients:** {_title(gain)}, with no interval (a language has a single "
                             "client), so this run cannot say whether the budget binds.")
        elif reference["outcome"] == "tie" and not same and best["outcome"] == "win":
            sentences.append(f"**{pool} clients: the budget binds only weakly.** {_title(gain)}, an interval that "
                             f"includes zero, so uniform rank buys nothing measurable here.{envelope} Extra rank pays "
                             "only through a method that spends it unevenly, by a margin this run can barely "
                             "resolve; with uniform LoRA, pick the cheapest budget.")
        elif reference["outcome"] == "tie":
            sentences.append(f"**{pool} clients: the budget does not bind.** {_title(gain)}, an interval that "
                             "includes zero: extra rank buys nothing measurable on this data, so rank-allocation "
                             f"methods cannot be told apart here.{envelope} A user of this data should {cheapest}.")
        elif reference["outcome"] == "loss":
            sentences.append(f"**{pool} clients: more budget hurts.** {_title(gain)}: the extra ranks cost accuracy "
                             f"at the selected learning rates.{envelope} Pick the cheapest budget; allocations "
                             "cannot win by spending more rank here.")
        else:
            flat = [m for m, e in own.items() if m not in (BUDGET_REFERENCE, "best") and e["outcome"] == "tie"]
            sentence = (f"**{pool} clients: the budget binds.** {_title(gain)}, so how the ranks are spent can "
                        f"matter here and the comparison of allocations means something.{envelope}")
            if flat:
                sentence += (f" {', '.join(flat)} gain nothing measurable from the extra budget (interval includes "
                             "zero) where uniform LoRA does.")
            sentences.append(sentence)
    return "\n\n".join(sentences)


def budget_markdown(effects: list[dict]) -> str:
    """The largest minus the smallest budget, per method and pool, with the paired interval."""
    lines = ["| pool | method | r=high minus r=low | 95% interval | outcome |", "|---|---|---|---|---|"]
    for e in effects:
        name = (f"best per budget ({e['best_low']} at r={e['low']}, {e['best_high']} at r={e['high']})"
                if e["method"] == "best" else e["method"])
        lines.append(f"| {e['pool']} | {name} | {_signed(e['difference'])} | [{_signed(e['ci_low'])}, "
                     f"{_signed(e['ci_high'])}] | {e['outcome']} |")
    return "\n".join(lines)


def language_intervals(units: Units, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Interval]:
    """Language -> mean over seeds of its pooled accuracy, with the bootstrap interval over its own clients."""
    languages = sorted({u[0] for u in units.values()})
    return {lang: bootstrap({k: u for k, u in units.items() if u[0] == lang}, resamples, seed) for lang in languages}


# ----------------------------------------------------------------------------------------------- structure


def kept_lambdas(row: dict) -> dict[str, list[float]]:
    """Module -> the lambdas a client kept. Rows normally store only the kept ones; when a row stores more than
    the module's rank, the largest ``rank`` are the kept ones (the top-k rule of docs/method.md)."""
    ranks = row.get("ranks", {})
    kept = {}
    for module, values in row.get("lambdas", {}).items():
        values = sorted((float(v) for v in values), reverse=True)
        rank = ranks.get(module, len(values))
        if rank > 0 and values:
            kept[module] = values[:rank]
    return kept


def lambda_spread(rows: Iterable[dict]) -> dict | None:
    """How much the kept lambdas vary: their mean (over clients of each client's mean), the spread across a
    client's modules (std of per-module means, averaged over clients), the spread across clients (std of
    per-client means), and their min/max. A generator that learned one magnitude for everyone shows ~0 spreads."""
    client_means, module_stds, lows, highs = [], [], [], []
    for row in rows:
        kept = kept_lambdas(row)
        if not kept:
            continue
        values = np.concatenate([np.array(v) for v in kept.values()])
        client_means.append(values.mean())
        module_stds.append(np.std([np.mean(v) for v in kept.values()]))
        lows.append(values.min())
        highs.append(values.max())
    if not client_means:
        return None
    return {"mean": float(np.mean(client_means)), "std_modules": float(np.mean(module_stds)),
            "std_clients": float(np.std(client_means)), "min": float(min(lows)), "max": float(max(highs)),
            "clients": len(client_means)}


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


def rank_overlap(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Share of allocation ``a`` that ``b`` also gives: sum_m min(a_m, b_m) / sum_m a_m (1 = identical
    allocation, 0 = disjoint modules); NaN when ``a`` allocates nothing."""
    total = sum(a.values())
    if total <= 0:
        return float("nan")
    return sum(min(value, b.get(module, 0.0)) for module, value in a.items()) / total


def _pairwise_overlap(matrix: np.ndarray) -> np.ndarray:
    """rank_overlap of every row of ``matrix`` with every other row, vectorised."""
    shared = np.minimum(matrix[:, None, :], matrix[None, :, :]).sum(axis=-1)
    totals = matrix.sum(axis=1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, shared / np.where(totals > 0, totals, 1), np.nan)


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def rank_agreement(allocations: Sequence[tuple[int, str, Mapping[str, float]]]) -> dict | None:
    """How language-specific rank maps are, from (seed, language, ranks) of each client: the overlap of the
    language-mean maps between different languages, and - like for like, at the client level - the overlap
    between two clients of one seed that share a language (the reference level: what a language has in common)
    or do not. Language means are smoother than single clients, so compare the first number with care."""
    if not allocations:
        return None
    modules = sorted({m for _, _, ranks in allocations for m in ranks})
    matrix = np.array([[float(ranks.get(m, 0)) for m in modules] for _, _, ranks in allocations])
    languages = np.array([lang for _, lang, _ in allocations])
    seeds = np.array([seed for seed, _, _ in allocations])
    names = sorted(set(languages))
    means = np.array([matrix[languages == lang].mean(axis=0) for lang in names])
    between = _pairwise_overlap(means)[~np.eye(len(names), dtype=bool)]
    same, different = [], []
    for seed in sorted(set(seeds)):
        rows = seeds == seed
        overlap, langs = _pairwise_overlap(matrix[rows]), languages[rows]
        off_diagonal = ~np.eye(len(langs), dtype=bool)
        same_language = langs[:, None] == langs[None, :]
        same.append(overlap[off_diagonal & same_language])
        different.append(overlap[~same_language])
    return {"languages": len(names), "clients": len(allocations),
            "between_language_means": _nanmean(between),
            "client_pairs_same_language": _nanmean(np.concatenate(same)),
            "client_pairs_different_language": _nanmean(np.concatenate(different))}


def structure(records: list[dict], pools: Sequence[str], budgets: Sequence[int], methods: Sequence[str]) -> list[dict]:
    """Per (budget, pool): the spread of FedP²EFT's kept lambdas and the rank-map agreement of every method whose
    rows carry ranks (fedp2eft-structure is left out: it reuses FedP²EFT's ranks)."""
    ranked = [m for m in methods if m != "fedp2eft-structure"]
    out = []
    for budget in budgets:
        for pool in pools:
            rows: dict[str, list[tuple[int, str, dict]]] = defaultdict(list)
            for record in records:
                if record["pool"] != pool:
                    continue
                for row in record["rows"]:
                    if row["budget"] == budget and row["method"] in ranked and row.get("ranks"):
                        rows[row["method"]].append((record["seed"], record["language"], row))
            if not rows:
                continue
            agreement = {m: rank_agreement([(s, lang, r["ranks"]) for s, lang, r in rows[m]])
                         for m in ranked if rows.get(m)}
            out.append({"budget": budget, "pool": pool,
                        "lambda": lambda_spread(r for _, _, r in rows.get(OURS, [])), "agreement": agreement})
    return out


# ------------------------------------------------------------------------------------------ PS generator


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


def _finish_axis(axis) -> None:
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


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


# ------------------------------------------------------------------------------------------------- tables


def _title(label: str) -> str:
    """'exact match' -> 'Exact match'; 'ROUGE-L F1' stays as it is."""
    return label[:1].upper() + label[1:]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _cell(entry: dict | None) -> str:
    """``mean ± half-width`` of the 95% interval, in points of the metric (%)."""
    if entry is None:
        return "–"
    return f"{_pct(entry['mean'])} ± {100 * (entry['ci_high'] - entry['ci_low']) / 2:.1f}"


def _pools(config: dict, keys: Iterable[Setting]) -> list[str]:
    pools = list(config.get("pools", []))
    return pools + sorted({k[0] for k in keys} - set(pools))


def _budgets(config: dict, keys: Iterable[Setting]) -> list[int]:
    return sorted(set(config.get("budgets", [])) | {k[2] for k in keys if k[2] != 0})


def _table_methods(config: dict, keys: Iterable[Setting]) -> list[str]:
    """Methods that produced rows plus those the config asked for (a method that produced nothing shows '–')."""
    return method_order({k[1] for k in keys} | set(config.get("methods", [])))


def is_baseline(method: str) -> bool:
    """A method FedP²EFT is measured against: neither FedP²EFT, nor the base model without personalization, nor
    one of FedP²EFT's own ablations."""
    return method not in (OURS, "base") and method not in ABLATIONS


def best_per_budget(summary: Mapping[Setting, dict], pool: str, methods: Sequence[str],
                    budgets: Sequence[int]) -> dict[int, float]:
    """Budget -> the highest mean of any method in that column (``base`` included: if no method beats the base
    model, the table should say so)."""
    best = {}
    for budget in budgets:
        means = [entry["mean"] for m in methods if (entry := _at(summary, pool, m, budget)) is not None]
        if means:
            best[budget] = max(means)
    return best


def main_table_markdown(summary: Mapping[Setting, dict], config: dict, label: str = "accuracy") -> str:
    pools, budgets, methods = _pools(config, summary), _budgets(config, summary), _table_methods(config, summary)
    lines = []
    for pool in pools:
        best = best_per_budget(summary, pool, methods, budgets)
        lines += [f"\n**{pool} clients** ({label} %, languages averaged, mean over seeds ± half-width of the 95% "
                  "client-bootstrap interval; best per budget in bold); `base` = no personalization\n",
                  "| method | " + " | ".join(f"r={b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for method in methods:
            cells = []
            for budget in budgets:
                entry = _at(summary, pool, method, budget)
                cell = _cell(entry)
                cells.append(f"**{cell}**" if entry is not None and entry["mean"] == best.get(budget) else cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}"


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


# About how many clients per language a language's interval needs to be a few points wide (docs/method.md,
# "Per-language intervals set the size": clients of one language differ by 4-5 points).
CLIENTS_FOR_LANGUAGE_CLAIMS = 9


def per_language_note(units: Mapping[Setting, Units]) -> str:
    """What the per-language tables can carry: with few clients per language and pool, a language's interval
    rests on those few clients, so its differences are descriptive; the pooled paired comparisons are the result."""
    clients: dict[tuple[str, str], set] = {}
    for (pool, _, _), per in units.items():
        for (_, client), (language, _, _) in per.items():
            clients.setdefault((pool, language), set()).add(client)
    fewest = min((len(found) for found in clients.values()), default=0)
    if fewest >= CLIENTS_FOR_LANGUAGE_CLAIMS:
        return ""
    return (f"\nWith as few as {fewest} client(s) per language and pool, a language's interval rests on those "
            f"clients alone (about {CLIENTS_FOR_LANGUAGE_CLAIMS} are needed for a few points): the differences "
            "below are descriptive. The pooled paired comparisons above, with clients as the replicates, are the "
            "result.\n")


def language_table_markdown(units: Mapping[Setting, Units], config: dict, budget: int,
                            label: str = "accuracy") -> str:
    """Rows = languages, columns = methods: each language's pooled metric (mean over seeds) ± half-width of
    the bootstrap interval over that language's clients."""
    pools, methods = _pools(config, units), _table_methods(config, units)
    lines = []
    for pool in pools:
        intervals = {m: language_intervals(u) for m in methods if (u := _at(units, pool, m, budget))}
        languages = sorted({lang for per in intervals.values() for lang in per})
        if not languages:
            continue
        lines += [f"\n**{pool} clients, r={budget}** ({label} %, mean over seeds ± half-width of the 95% "
                  "bootstrap interval over the language's clients)\n",
                  "| language | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for language in languages:
            cells = []
            for method in methods:
                interval = intervals.get(method, {}).get(language)
                cells.append("–" if interval is None else f"{_pct(interval.mean)} ± {100 * interval.half_width:.1f}")
            lines.append(f"| {language} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def language_records(units: Mapping[Setting, Units], budgets: Iterable[int]) -> list[dict]:
    """The per-language intervals shown in the report, as data for results.json."""
    out = []
    for (pool, method, budget), per in sorted(units.items()):
        if budget in budgets or budget == 0:
            for language, interval in language_intervals(per).items():
                out.append({"pool": pool, "method": method, "budget": budget, "language": language,
                            "mean": interval.mean, "ci_low": interval.low, "ci_high": interval.high})
    return out


def _number(value, digits: int = 3) -> str:
    """Three decimals, or three significant digits for values too small to show that way (lambda starts at 1e-4)."""
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:.{digits}f}" if value == 0 or abs(value) >= 10 ** -digits else f"{value:.{digits}g}"


def structure_markdown(entries: list[dict]) -> str:
    """One small table per budget (columns = pools): kept-lambda spread, then rank-map agreement per method."""
    lines = []
    for budget in sorted({e["budget"] for e in entries}):
        block = [e for e in entries if e["budget"] == budget]
        pools = [e["pool"] for e in block]
        methods = method_order({m for e in block for m in e["agreement"]})
        rows = [("mean kept λ", lambda e: _number((e["lambda"] or {}).get("mean"))),
                ("std of kept λ across modules (within a client)",
                 lambda e: _number((e["lambda"] or {}).get("std_modules"))),
                ("std of kept λ across clients", lambda e: _number((e["lambda"] or {}).get("std_clients"))),
                ("min / max kept λ", lambda e: "–" if not e["lambda"] else
                 f"{_number(e['lambda']['min'])} / {_number(e['lambda']['max'])}")]
        for method in methods:
            for key, label in [("between_language_means", "overlap of language-mean rank maps, different languages"),
                               ("client_pairs_same_language", "overlap of two clients, same language (reference)"),
                               ("client_pairs_different_language", "overlap of two clients, different languages")]:
                rows.append((f"{method}: {label}",
                             lambda e, m=method, k=key: _number((e["agreement"].get(m) or {}).get(k))))
        lines += [f"\n**r={budget}**\n", "| | " + " | ".join(pools) + " |", "|---|" + "---|" * len(pools)]
        lines += [f"| {label} | " + " | ".join(f(e) for e in block) + " |" for label, f in rows]
        lines += [_agreement_sentence(e, budget) for e in block if e["agreement"].get(OURS)]
    return "\n".join(lines)


def _agreement_sentence(entry: dict, budget: int) -> str:
    """Says whether FedP²EFT's rank maps depend on the language more than on the client, from the numbers."""
    a = entry["agreement"][OURS]
    same, different = a["client_pairs_same_language"], a["client_pairs_different_language"]
    if not (np.isfinite(same) and np.isfinite(different)):
        return ""
    gap = same - different
    reading = ("clients of one language share noticeably more of their allocation than clients of different "
               "languages" if gap > 0.02 else
               "the allocation is about as similar across languages as within one: the generator gives no "
               "language-specific structure beyond client-to-client variation")
    return (f"\n{entry['pool']} r={budget}: two FedP²EFT clients of the same language overlap by {same:.3f}, of "
            f"different languages by {different:.3f}; {reading}.")


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


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}%"


def _lr(value) -> str:
    return f"{float(value):g}"


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


# ------------------------------------------------------------------------------------------------ figures


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


def mean_rank_grid(records: list[dict], budget: int) -> tuple[list[str], list[str], np.ndarray] | None:
    """(languages, modules, mean rank FedP²EFT gives each module per language at ``budget``), or None."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    modules: set[str] = set()
    for record in records:
        for row in record["rows"]:
            if row["method"] == OURS and row["budget"] == budget and row.get("ranks"):
                counts[record["language"]] += 1
                for name, rank in row["ranks"].items():
                    sums[record["language"]][name] += rank
                    modules.add(name)
    if not counts:
        return None
    languages, ordered = sorted(counts), sorted(modules, key=_module_order)
    return languages, ordered, np.array([[sums[lang][m] / counts[lang] for m in ordered] for lang in languages])


def heatmap_budget(records: list[dict], budgets: Sequence[int]) -> int:
    """The budget whose rank maps vary most across modules (the most informative picture: at r = R every
    module has every rank and the map is flat), ties to the smaller budget."""
    spreads = [(float(np.std(grid[2])), -budget, budget) for budget in budgets
               if (grid := mean_rank_grid(records, budget)) is not None]
    return max(spreads)[2] if spreads else (budgets[0] if budgets else 0)


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


def _module_order(name: str) -> tuple:
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    return (numbers or [0], name)


def _short(name: str) -> str:
    """The part of a module name from the block index on, e.g. '3.attention.self.query'."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), 0)
    return ".".join(parts[index:])


# ------------------------------------------------------------------------------------------------- output


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
        Console().print(budget_verdict(facts["budget"]).replace("**", ""))


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
        f"{', '.join(config['methods'])} at budgets {', '.join(map(str, budgets))}; seeds {config.get('seeds')}. "
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


def print_main_table(summary: Mapping[Setting, dict], config: dict, label: str = "accuracy") -> None:
    """The main table on the terminal, best per budget in bold."""
    console = Console()
    budgets, methods = _budgets(config, summary), _table_methods(config, summary)
    for pool in _pools(config, summary):
        best = best_per_budget(summary, pool, methods, budgets)
        table = Table(title=f"{config['name']}: {pool} clients, {label} % (languages averaged, ± 95% CI half-width)")
        table.add_column("method")
        for budget in budgets:
            table.add_column(f"r={budget}", justify="right")
        for method in methods:
            cells = []
            for budget in budgets:
                entry = _at(summary, pool, method, budget)
                bold = entry is not None and entry["mean"] == best.get(budget)
                cells.append(f"[bold]{_cell(entry)}[/bold]" if bold else _cell(entry))
            table.add_row(method, *cells)
        console.print(table)


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


def rewritten_note(command: str) -> str:
    return (f"This report was written again from the run's own records by `{command}`: its tables and verdicts "
            "are this version's, its numbers the run's.\n")


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
              "personalized-FL algorithm (FedDPA-T: global model plus the client's local LoRA; DEPT: global body "
              "plus the client's own embeddings; docs/method.md, \"Personalized-FL bases\"). Percentage points, "
              "paired 95% client-bootstrap intervals; win = the interval lies above zero.\n",
              "## FedP²EFT minus the best baseline\n", "\n".join(lines), ""]
    (Path(run_dir) / "report.md").write_text("\n".join(header + sections) + "\n")
    (Path(run_dir) / "results.json").write_text(json.dumps(_jsonable({"config": config, "command": command,
                                                                      "bases": per_base}), indent=1))


def privacy_spent(run_dir: Path) -> list[dict]:
    """The privacy of every federated stage trained with DP or secure aggregation, from its metrics.jsonl: for DP
    its last round's ``privacy/*`` entries (ε at δ after all its rounds, and the noise, clipping and sampling that
    gave it); for SecAgg+ the shares and threshold, and the largest quantization error bound of a round."""
    entries = []
    for path in sorted(Path(run_dir).glob("base/metrics.jsonl")) + sorted(Path(run_dir).glob("seed*/*/metrics.jsonl")):
        rows = read_rounds(path)
        private, secure = [row for row in rows if "privacy/epsilon" in row], [row for row in rows if "secagg/shares" in row]
        entry = {"stage": path.parent.relative_to(run_dir).as_posix(), "rounds": rows[-1]["round"] if rows else 0}
        if private:
            entry.update({key.removeprefix("privacy/"): value for key, value in private[-1].items()
                          if key.startswith("privacy/")})
        if secure:
            entry["secagg"] = {"shares": secure[-1]["secagg/shares"], "threshold": secure[-1]["secagg/threshold"],
                               "error_bound": max(row["secagg/error_bound"] for row in secure)}
        if private or secure:
            entries.append(entry)
    return entries


def privacy_markdown(entries: list[dict]) -> str:
    """One table per kind of protection: user-level (ε, δ) of each DP-trained stage after its rounds, and the
    SecAgg+ settings of each securely aggregated stage."""
    private, secure = [e for e in entries if "epsilon" in e], [e for e in entries if "secagg" in e]
    lines = []
    if private:
        lines += ["User-level differential privacy of the federated stages trained with it (DP-FedAvg: each client's "
                  "update clipped to norm C, equal weights, Gaussian noise z·C on the sum; ε from an RDP accountant "
                  "for fixed-size sampling without replacement; docs/federation.md, \"Differential privacy\"). "
                  "Stages not listed were trained without DP.\n",
                  "| stage | rounds | ε | δ | noise multiplier z | clipping norm C | sampling rate |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {e['stage']} | {e['rounds']} | {e['epsilon']:.3g} | {e['delta']:g} | {e['noise_multiplier']:g} "
                  f"| {e['clipping_norm']:g} | {e['sampling_rate']:.3g} |" for e in private]
    if secure:
        lines += [("\n" if lines else "") + "Stages aggregated with SecAgg+ (the server learned only the weighted "
                  "average of each round's updates, and each client's example count and training metrics; "
                  "docs/federation.md, \"Secure aggregation\"):\n",
                  "| stage | rounds | shares | threshold | largest quantization error of an averaged entry |",
                  "|---|---|---|---|---|"]
        lines += [f"| {e['stage']} | {e['rounds']} | {e['secagg']['shares']} | {e['secagg']['threshold']} | "
                  f"{e['secagg']['error_bound']:.2g} |" for e in secure]
    return "\n".join(lines)


def reference_rows(config: dict, metric_name: str, units: Mapping[Setting, Units]) -> list[dict]:
    """The comparison with ``report.reference_run`` (another run's folder), if the config names one."""
    reference = config.get("report", {}).get("reference_run")
    if not reference:
        return []
    path = Path(reference) / "personalize.jsonl"
    if not path.is_file():
        raise FedP2EFTError(f"report.reference_run: {path} does not exist; name a finished run's folder")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return against_reference(units, client_units(records, metric_name))


def against_reference(units: Mapping[Setting, Units], reference: Mapping[Setting, Units]) -> list[dict]:
    """This run minus the reference run for every (pool, method, budget) both have, paired on the same (seed,
    client) units: what a change of setting (e.g. DP on the PS generator) costs each method."""
    rows = []
    for setting in sorted(set(units) & set(reference)):
        interval = paired_bootstrap(units[setting], reference[setting])
        if interval is not None:
            pool, method, budget = setting
            rows.append({"pool": pool, "method": method, "budget": budget, "difference": interval.mean,
                         "ci_low": interval.low, "ci_high": interval.high, "outcome": interval.outcome})
    return rows


def reference_markdown(rows: list[dict], reference: str, label: str) -> str:
    """Rows = method, columns = pool and budget, cells = this run minus the reference with the paired interval."""
    settings = sorted({(r["pool"], r["budget"]) for r in rows})
    cells = {(r["method"], r["pool"], r["budget"]): r for r in rows}
    lines = [f"This run minus the reference run `{reference}` ({label} points; paired on the same seeds and clients, "
             "95% interval; 'loss' = this run is worse beyond noise).\n",
             "| method | " + " | ".join(f"{p} r={b}" for p, b in settings) + " |", "|---|" + "---|" * len(settings)]
    for method in method_order({r["method"] for r in rows}):
        row = ["–" if (c := cells.get((method, p, b))) is None else
               f"{_signed(c['difference'])} [{_signed(c['ci_low'])}, {_signed(c['ci_high'])}] {c['outcome']}"
               for p, b in settings]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)
