"""Does the budget bind? What the largest rank budget buys over the smallest, paired on the same clients, and the
plain sentences that say what follows for choosing a budget and for comparing allocations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedp2eft.benchmark.report.formatting import _signed, _title
from fedp2eft.benchmark.report.records import Setting, Units
from fedp2eft.benchmark.report.stats import BOOTSTRAP_SEED, RESAMPLES, paired_difference

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
