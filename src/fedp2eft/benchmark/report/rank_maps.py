"""The structure the personalization gives: FedP²EFT's kept lambdas, how much rank maps overlap within and
across languages, and the mean rank per module and language that the heatmap shows."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fedp2eft.benchmark.report.formatting import _number
from fedp2eft.benchmark.report.records import OURS, method_order


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
    per-client means), and their min/max. A generator that learned one magnitude for everyone shows ~0 spreads.
    ``tie_order``: the mean share of a client's kept entries that tied with one left out (None for rows written
    before it was recorded): a map chosen by tie order is the sort's, not the generator's."""
    client_means, module_stds, lows, highs, ties = [], [], [], [], []
    for row in rows:
        kept = kept_lambdas(row)
        if not kept:
            continue
        values = np.concatenate([np.array(v) for v in kept.values()])
        if "tie_order" in row:
            ties.append(row["tie_order"] / len(values))
        client_means.append(values.mean())
        module_stds.append(np.std([np.mean(v) for v in kept.values()]))
        lows.append(values.min())
        highs.append(values.max())
    if not client_means:
        return None
    return {"mean": float(np.mean(client_means)), "std_modules": float(np.mean(module_stds)),
            "std_clients": float(np.std(client_means)), "min": float(min(lows)), "max": float(max(highs)),
            "clients": len(client_means), "tie_order": float(np.mean(ties)) if ties else None}


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


def _module_order(name: str) -> tuple:
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    return (numbers or [0], name)


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
                 f"{_number(e['lambda']['min'])} / {_number(e['lambda']['max'])}"),
                ("kept entries chosen by tie order (share, mean over clients)",
                 lambda e: _share((e["lambda"] or {}).get("tie_order")))]
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


def _share(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


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
