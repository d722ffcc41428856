"""The metric tables: every method by budget (best per budget in bold), and per language with each language's
own client-bootstrap interval."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from fedp2eft.benchmark.report.formatting import _cell, _pct
from fedp2eft.benchmark.report.records import Setting, Units, _at, _budgets, _pools, _table_methods
from fedp2eft.benchmark.report.stats import language_intervals


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
