"""The report's statistics: the paper's metric, its client bootstrap, and paired comparisons of two methods on the
same resampled clients.

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

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedp2eft.benchmark.report.records import OURS, Setting, Units, _at, client_units

RESAMPLES = 2000
BOOTSTRAP_SEED = 20240601
LEVEL = 0.95


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


def language_intervals(units: Units, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Interval]:
    """Language -> mean over seeds of its pooled accuracy, with the bootstrap interval over its own clients."""
    languages = sorted({u[0] for u in units.values()})
    return {lang: bootstrap({k: u for k, u in units.items() if u[0] == lang}, resamples, seed) for lang in languages}
