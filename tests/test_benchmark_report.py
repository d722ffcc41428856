"""The report's statistics on synthetic records: the client bootstrap, the paired win/tie/loss rule, methods outside
the known order, rank-map overlap, the flattening round of a training curve, and a full write_report run."""

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fedp2eft.benchmark.report import write_report
from fedp2eft.benchmark.report.psg import flattening_round
from fedp2eft.benchmark.report.rank_maps import lambda_spread, rank_agreement, rank_overlap
from fedp2eft.benchmark.report.records import client_units
from fedp2eft.benchmark.report.stats import bootstrap, compare, metric, paired_bootstrap, summarize
from fedp2eft.benchmark.report.tables import main_table_markdown

MODULES = [f"encoder.layer.{i}.attention.self.{p}" for i in range(3) for p in ("query", "value")]


def _units(rng, languages=("en", "de"), clients=3, seeds=(0,), count=48, skill=0.6):
    """(seed, client) -> (language, correct, count) with client-to-client spread around ``skill``."""
    units = {}
    for seed in seeds:
        for language in languages:
            for c in range(clients):
                p = float(np.clip(skill + rng.normal(0, 0.15), 0.05, 0.95))
                units[(seed, f"{language}-s{c}")] = (language, int(rng.binomial(count, p)), count)
    return units


def test_bootstrap_interval_contains_estimate_and_shrinks_with_more_clients():
    rng = np.random.default_rng(0)
    few, many = _units(rng, clients=3), _units(rng, clients=40)
    small, large = bootstrap(few), bootstrap(many)
    for interval in (small, large):
        assert interval.low <= interval.mean <= interval.high
        assert interval.high > interval.low
    assert large.half_width < small.half_width
    # the point estimate is the paper's metric: pooled per language, then averaged over languages
    en = [u for u in few.values() if u[0] == "en"]
    de = [u for u in few.values() if u[0] == "de"]
    expected = (sum(u[1] for u in en) / sum(u[2] for u in en) + sum(u[1] for u in de) / sum(u[2] for u in de)) / 2
    assert metric(few) == pytest.approx(expected)


def test_bootstrap_keeps_every_language_and_is_deterministic():
    # one language at 100%, the other at 0%: any resample that dropped a language would leave 0.5
    units = {(0, f"a{i}"): ("a", 10, 10) for i in range(4)} | {(0, f"b{i}"): ("b", 0, 10) for i in range(2)}
    interval = bootstrap(units)
    assert interval.low == interval.high == interval.mean == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    noisy = _units(rng, clients=5, seeds=(0, 1))
    assert bootstrap(noisy) == bootstrap(noisy)


def test_constant_margin_is_a_win_and_noise_is_a_tie():
    rng = np.random.default_rng(2)
    theirs = _units(rng, clients=10, seeds=(0, 1), skill=0.5)
    better = {k: (lang, correct + 5, count) for k, (lang, correct, count) in theirs.items()}
    win = paired_bootstrap(better, theirs)
    assert win.outcome == "win" and win.low > 0
    assert win.mean == pytest.approx(5 / 48)
    assert paired_bootstrap(theirs, better).outcome == "loss"
    # identical up to +-1 correct answer, alternating so the noise has no direction
    noise = {k: (lang, correct + (1 if i % 2 else -1), count)
             for i, (k, (lang, correct, count)) in enumerate(sorted(theirs.items()))}
    tie = paired_bootstrap(noise, theirs)
    assert tie.outcome == "tie" and tie.low < 0 < tie.high
    assert abs(tie.mean) < 0.01


def _record(seed, pool, language, index, rows):
    return {"seed": seed, "pool": pool, "client": f"{language}-{pool[0]}{index}", "language": language, "rows": rows}


def _ranks(budget, language, index):
    """A rank map with total budget * len(MODULES): languages favour different halves, clients differ a bit."""
    first_half = np.arange(len(MODULES)) < len(MODULES) // 2
    weights = np.where(first_half == (language == "en"), 3.0, 1.0)
    weights[index % len(MODULES)] += 1
    ranks = np.floor(weights / weights.sum() * budget * len(MODULES)).astype(int)
    ranks[0] += budget * len(MODULES) - ranks.sum()
    return {m: int(r) for m, r in zip(MODULES, ranks)}


def _records(methods=("lora", "fedp2eft", "fedp2eft-structure", "btlora"), budgets=(2, 8), seeds=(0, 1),
             pools=("seen", "unseen"), languages=("en", "de"), clients=3, margin=None, budget_gain=None):
    """Synthetic rows: every method ``margin[method]`` answers above LoRA, plus ``budget_gain[method]`` answers per
    step up the budget list (none by default: the budget does not bind)."""
    rng = np.random.default_rng(3)
    budget_gain = budget_gain or {}
    margin = margin or {"lora": 0, "fedp2eft": 6, "fedp2eft-structure": 3, "btlora": 1}
    records = []
    for seed in seeds:
        for pool in pools:
            for language in languages:
                for index in range(clients):
                    base = int(rng.integers(10, 25))
                    rows = [{"method": "base", "budget": 0, "correct": base, "count": 48, "score": base / 48,
                             "seconds": 0.1}]
                    for budget in budgets:
                        for method in methods:
                            correct = min(48, base + 8 + margin.get(method, 0) + int(rng.integers(0, 3))
                                          + budget_gain.get(method, 0) * budgets.index(budget))
                            row = {"method": method, "budget": budget, "correct": correct, "count": 48,
                                   "score": correct / 48, "seconds": 1.0, "lr": 0.001, "train_loss_last_epoch": 0.5}
                            if method in ("fedp2eft", "fedp2eft-structure", "btlora"):
                                row["ranks"] = _ranks(budget, language, index + seed)
                            if method == "fedp2eft":
                                row["lambdas"] = {m: [2.0 + 0.1 * index - 0.01 * k for k in range(r)]
                                                  for m, r in row["ranks"].items()}
                            rows.append(row)
                    records.append(_record(seed, pool, language, index, rows))
    return records


def test_unknown_method_still_appears_in_tables_and_comparisons():
    records = _records(methods=("lora", "fedp2eft", "my-new-method"), budgets=(4,), seeds=(0,), pools=("seen",),
                       margin={"my-new-method": 2})
    config = {"pools": ["seen"], "budgets": [4], "methods": ["lora", "fedp2eft"]}
    summary = summarize(records, resamples=200)
    assert ("seen", "my-new-method", 4) in summary
    table = main_table_markdown(summary, config)
    assert "| my-new-method |" in table and "| base |" in table
    assert table.index("| lora |") < table.index("| fedp2eft |") < table.index("| my-new-method |")
    units = client_units(records)
    compared = {c["method"] for c in compare(units, ["seen"], [4], ["base", "lora", "fedp2eft", "my-new-method"])}
    assert compared == {"base", "lora", "my-new-method"}


def test_rank_overlap_identical_disjoint_and_agreement():
    a = {"q": 2.0, "v": 2.0, "o": 0.0}
    assert rank_overlap(a, dict(a)) == 1.0
    assert rank_overlap(a, {"q": 0.0, "v": 0.0, "o": 4.0}) == 0.0
    assert rank_overlap(a, {"q": 2.0, "o": 2.0}) == 0.5
    same = {"q": 4, "v": 0}
    other = {"q": 0, "v": 4}
    agreement = rank_agreement([(0, "en", same), (0, "en", same), (0, "de", other), (0, "de", other)])
    assert agreement["client_pairs_same_language"] == 1.0
    assert agreement["client_pairs_different_language"] == 0.0
    assert agreement["between_language_means"] == 0.0


def test_lambda_spread_separates_modules_and_clients():
    rows = [{"ranks": {"q": 2, "v": 1, "o": 0}, "lambdas": {"q": [1.0, 1.0], "v": [3.0], "o": []}},
            {"ranks": {"q": 1, "v": 1}, "lambdas": {"q": [2.0, 0.5], "v": [2.0]}}]  # q stores one lambda too many
    spread = lambda_spread(rows)
    assert spread["clients"] == 2
    assert spread["mean"] == pytest.approx((5 / 3 + 2.0) / 2)
    assert spread["std_modules"] == pytest.approx((1.0 + 0.0) / 2)
    assert spread["std_clients"] == pytest.approx(np.std([5 / 3, 2.0]))
    assert (spread["min"], spread["max"]) == (1.0, 3.0)
    assert spread["tie_order"] is None  # rows written before ties were recorded
    rows[0]["tie_order"], rows[1]["tie_order"] = 3, 0  # all 3 kept entries of client 0 by tie order, none of 1's
    assert lambda_spread(rows)["tie_order"] == pytest.approx((1.0 + 0.0) / 2)


def test_flattening_round():
    rounds = list(range(1, 21))
    saturating = [3.0 * (1 - 0.5 ** r) for r in rounds]  # within 5% of 3.0 once 0.5**r <= ~0.05
    flat = flattening_round(rounds, saturating)
    assert flat == 5
    assert all(abs(v - saturating[-1]) <= 0.05 * saturating[-1] for v in saturating[flat - 1:])
    assert abs(saturating[flat - 2] - saturating[-1]) > 0.05 * saturating[-1]
    rising = [0.1 * r for r in rounds]
    assert flattening_round(rounds, rising) is None
    assert flattening_round([1], [1.0]) is None
    assert flattening_round([1, 2, 3, 4], [-2.0, -1.0, -1.02, -1.0]) == 2


def _write_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "selection.json").write_text(json.dumps({
        "grid": [0.3, 1.0, 3.0], "validation_fraction": 0.2, "clients": ["en-s0", "de-s0"],
        "results": [{"method": m, "budget": b, "scale": scale, "lr": 0.001 * scale, "val_accuracy": 0.5 + scale / 10,
                     "val_count": 20}
                    for m in ("lora", "btlora", "fedp2eft") for b in (2, 8) for scale in (0.3, 1.0, 3.0)],
        "chosen": {m: {"2": 3.0, "8": 1.0} for m in ("lora", "btlora", "fedp2eft")}}))
    for seed, flat_from in ((0, 6), (1, 9)):
        folder = run_dir / f"seed{seed}" / "psg"
        folder.mkdir(parents=True)
        rows = [{"round": r, "train/stage1_loss": 2.0 / r, "train/l1_before": 0.1,
                 "train/mean_lambda": 1.0 + min(r, flat_from) * 0.5} for r in range(1, 21)]
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return run_dir


def test_write_report_end_to_end(tmp_path):
    run_dir = _write_run(tmp_path)
    records = _records()
    config = {"name": "synthetic", "model": "tiny", "dataset": "toy", "seeds": [0, 1], "pools": ["seen", "unseen"],
              "methods": ["lora", "fedp2eft", "fedp2eft-structure", "btlora"], "budgets": [2, 8], "personalize": {}}
    write_report(config, run_dir, records, {"base": 60.0, "psg": 120.0, "personalize": 30.0}, "fedp2eft benchmark")

    report = (run_dir / "report.md").read_text()
    for text in ["Does FedP²EFT win?", "r=8", "Verdict", "Per language", "Learning-rate selection",
                 "PS generator training", "overlap of two clients, same language", "mean kept λ",
                 "flattened in 2 of 2 seed(s) (by round 6 in seed0, 9 in seed1)",
                 "stage-1 loss** flattened in 0 of 2", "did not flatten within 20 rounds in seed0",
                 "fedp2eft-structure", "3 of 6 choices lie on an edge of the grid (x0.3: 0, x3: 3)"]:
        assert text in report, text
    assert " ± " in report and "] win" in report
    # FedP²EFT (+6) against the best baseline of each cell, btlora (+1); fedp2eft-structure (+3) is an ablation
    assert "| FedP²EFT minus the best baseline |" in report and "(vs btlora)" in report
    assert "| lora | 0.003 (x3) | 0.001 (x1) |" in report  # chosen scale shown as the learning rate it gave
    assert "**0.003: 80.0**" in report and "**0.001: 60.0**" in report and "**0.0003" not in report

    results = json.loads((run_dir / "results.json").read_text())
    settings = {(row["pool"], row["method"], row["budget"]) for row in results["summary"]}
    expected = {(p, m, b) for p in config["pools"] for m in config["methods"] for b in config["budgets"]}
    assert settings == expected | {(p, "base", 0) for p in config["pools"]}
    for row in results["summary"]:
        assert {"pool", "method", "budget", "mean", "ci_low", "ci_high", "seeds"} <= set(row)
        assert row["ci_low"] <= row["mean"] <= row["ci_high"] and row["seeds"] == 2
    outcomes = {(c["method"], c["pool"], c["budget"]): c["outcome"] for c in results["comparisons"]}
    assert outcomes[("base", "seen", 2)] == "win" and outcomes[("lora", "unseen", 8)] == "win"
    assert len(outcomes) == 4 * 2 * 2  # base, lora, btlora, fedp2eft-structure x pools x budgets
    structure_settings = {(s["budget"], s["pool"]) for s in results["structure"]}
    assert structure_settings == {(b, p) for b in (2, 8) for p in ("seen", "unseen")}
    lam = results["structure"][0]["lambda"]
    assert lam["min"] <= lam["mean"] <= lam["max"] and lam["std_clients"] > 0
    assert [e["train/mean_lambda"]["flattened_at"] for e in results["psg_training"]] == [6, 9]

    with (run_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == {"seed", "pool", "method", "budget", "language", "accuracy"}
    assert len(rows) == 2 * 2 * 2 * (1 + 4 * 2)  # seeds x pools x languages x (base + methods x budgets)
    for name in ("accuracy_vs_budget.png", "rank_heatmap.png", "psg_training.png"):
        assert (run_dir / "figures" / name).stat().st_size > 1000, name


def _write_metrics(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_report_counts_each_stages_traffic_and_what_shipping_adapters_would_cost(tmp_path):
    run_dir = tmp_path / "run"
    _write_metrics(run_dir / "base" / "metrics.jsonl",
                   [{"round": r, "sampled": 2, "bytes_sent": 6_000_000, "bytes_received": 6_000_000} for r in range(5)])
    for seed in (0, 1):  # 4 clients a round, 20 rounds, 0.25 MB down and 0.2 MB up per client and round
        _write_metrics(run_dir / f"seed{seed}" / "psg" / "metrics.jsonl",
                       [{"round": r, "sampled": 4, "bytes_sent": 1_000_000, "bytes_received": 800_000}
                        for r in range(20)])
    _write_metrics(run_dir / "seed0" / "fedl2p" / "metrics.jsonl", [{"round": 1, "sampled": 4}])  # before counting
    out = {"query": 8, "value": 4}  # the base checkpoint names the modules without the wrapper's "encoder." prefix
    checkpoint = tmp_path / "base-model"
    checkpoint.mkdir()
    save_file({f"layer.{i}.attention.self.{p}.weight": torch.zeros(out[p], 6) for i in range(3) for p in out},
              str(checkpoint / "model.safetensors"))
    records = _records(methods=("lora", "fedp2eft"))
    config = {"name": "traffic", "model": "tiny", "dataset": "toy", "seeds": [0, 1], "pools": ["seen", "unseen"],
              "methods": ["lora", "fedp2eft"], "budgets": [2, 8], "personalize": {}}
    write_report(config, run_dir, records, {"personalize": 1.0}, "cmd", base_model=checkpoint)

    section = (run_dir / "report.md").read_text().split("## Communication")[1]
    assert "| base | 1 | 5 | 10 | 30 | 30 | 3 / 3 |" in section
    assert "| psg | 2 | 40 | 160 | 40 | 32 | 0.25 / 0.2 |" in section
    assert "fedl2p" not in section
    adapters = [row["ranks"] for record in records for row in record["rows"] if row["method"] == "fedp2eft"]
    expected = sum(4 * r * (6 + out[m.rsplit(".", 1)[1]]) for ranks in adapters for m, r in ranks.items())
    assert len(adapters) == 2 * 2 * 2 * 3 * 2  # seeds x pools x languages x clients x budgets
    row = f"| every FedP²EFT adapter, shipped once instead | 2 | – | 48 adapters | {expected / 1e6:.3g} | – |"
    assert row in section
    communication = json.loads((run_dir / "results.json").read_text())["communication"]
    assert communication["adapters"]["bytes"] == expected
    assert communication["stages"]["psg"]["per_client_round"] == {"sent": 250_000, "received": 200_000}


def test_report_says_so_when_fedp2eft_loses(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = _records(methods=("lora", "fedp2eft"), budgets=(2,), seeds=(0,), pools=("seen",),
                       margin={"lora": 6, "fedp2eft": 0})
    config = {"name": "losing", "model": "tiny", "dataset": "toy", "seeds": [0], "pools": ["seen"],
              "methods": ["lora", "fedp2eft", "adalora"], "budgets": [2], "personalize": {}}
    write_report(config, run_dir, records, {"personalize": 1.0}, "cmd")
    report = (run_dir / "report.md").read_text()
    assert "loses 1" in report and "docs/discussion.md" in report
    assert "| adalora | – |" in report  # asked for, produced nothing: shown as missing, not dropped
    assert "PS generator training" not in report and "Learning-rate selection" not in report


def test_relative_growth_tells_a_slowing_curve_from_a_steady_one():
    from fedp2eft.benchmark.report.psg import relative_growth

    slowing = [1 - 0.9 ** r for r in range(1, 41)]
    steady = [0.1 * r for r in range(1, 41)]
    assert relative_growth(slowing, 1) > 5 * relative_growth(slowing, 3) > 0
    assert relative_growth(steady, 3) == pytest.approx(relative_growth(steady, 1)) == pytest.approx(0.1 / 4.0)
    assert relative_growth([1.0, 2.0], 3) is None


def test_instruction_rows_report_rouge_first_and_exact_match_beside_it(tmp_path):
    """Rows of an instruction run carry ROUGE-L (main), exact match and next-token accuracy as [sum, count]: the
    tables, comparisons and CSV follow the main metric, and exact match gets its own table and verdict."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = []
    for pool in ("seen", "unseen"):
        for language in ("en", "zh-CN"):
            for c in range(3):
                rows = []
                for method, rouge, exact in (("base", 0.2, 0), ("lora", 0.5, 6), ("fedp2eft", 0.7, 2)):
                    rouge_sum = 24 * (rouge + 0.01 * c)
                    rows.append({"method": method, "budget": 0 if method == "base" else 4, "metric": "rouge_l",
                                 "correct": rouge_sum, "count": 24,
                                 "scores": {"rouge_l": [rouge_sum, 24], "exact_match": [exact + c, 24],
                                            "token_accuracy": [100 + c, 200]}})
                records.append({"seed": 0, "pool": pool, "client": f"{language}-{pool[0]}{c}",
                                "language": language, "rows": rows})
    config = {"name": "chat", "model": "tiny-llama", "dataset": "intents-chat", "seeds": [0],
              "pools": ["seen", "unseen"], "methods": ["lora", "fedp2eft"], "budgets": [4], "personalize": {}}
    write_report(config, run_dir, records, {"personalize": 1.0}, "cmd")
    report = (run_dir / "report.md").read_text()
    assert "## ROUGE-L F1 by budget" in report and "## Exact match by budget" in report
    assert "rouge-score" in report and "tokenizer tokens" in report  # how ROUGE-L is tokenized is said
    assert "in ROUGE-L F1 points" in report
    results = json.loads((run_dir / "results.json").read_text())
    assert results["metric"] == "rouge_l"
    main = {(c["method"], c["pool"]): c for c in results["comparisons"]}
    assert main[("lora", "seen")]["outcome"] == "win" and main[("lora", "seen")]["difference"] == pytest.approx(0.2)
    exact = {(c["method"], c["pool"]): c for c in results["other_metrics"]["exact_match"]["comparisons"]}
    assert exact[("lora", "seen")]["outcome"] == "loss"  # 2+c vs 6+c of 24: FedP²EFT is worse on exact match
    assert exact[("lora", "seen")]["difference"] == pytest.approx(-4 / 24)
    with (run_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == {"seed", "pool", "method", "budget", "language", "rouge_l", "exact_match",
                            "token_accuracy"}
    first = next(r for r in rows if r["method"] == "lora" and r["language"] == "en" and r["pool"] == "seen")
    assert float(first["token_accuracy"]) == pytest.approx(303 / 600)


def test_one_client_per_language_gives_no_verdict():
    """A bootstrap over one client per language has zero width: the comparison is reported, never called a win."""
    ours = {(0, "en-s0"): ("en", 40, 48), (0, "de-s0"): ("de", 30, 48)}
    theirs = {(0, "en-s0"): ("en", 20, 48), (0, "de-s0"): ("de", 10, 48)}
    units = {("seen", "fedp2eft", 2): ours, ("seen", "lora", 2): theirs}
    (comparison,) = compare(units, ["seen"], [2], ["lora", "fedp2eft"])
    assert comparison["ci_low"] == comparison["ci_high"] and comparison["outcome"] == "untested"
    from fedp2eft.benchmark.report.verdicts import verdict

    summary = {setting: {"mean": metric(per)} for setting, per in units.items()}
    text = verdict([comparison], summary)
    assert "wins 0, ties 0 and loses 0 of 1 cells" in text and "no interval" in text
    assert "every cell" not in text


def test_the_verdict_is_against_the_best_baseline_and_keeps_own_ablations_apart(tmp_path):
    """The headline counts FedP²EFT against the best baseline of each cell, not wins over every row; its own
    ablation (fedp2eft-structure) is never that baseline, even when it scores highest, and is listed apart."""
    from fedp2eft.benchmark.report.verdicts import verdict

    records = _records(methods=("lora", "btlora", "fedp2eft", "fedp2eft-structure"), seeds=(0,),
                       margin={"lora": 0, "btlora": 3, "fedp2eft": 6, "fedp2eft-structure": 12})
    units, summary = client_units(records), summarize(records)
    comparisons = compare(units, ["seen", "unseen"], [2, 8], ["base", "lora", "btlora", "fedp2eft-structure",
                                                               "fedp2eft"])
    text = verdict(comparisons, summary)
    assert "against the best baseline of each cell, FedP²EFT wins 4, ties 0 and loses 0 of 4 cells" in text
    assert "every cell of this run" in text
    assert "Against every baseline separately it wins 8, ties 0 and loses 0 of 8 comparisons" in text  # not base
    assert "Against its own ablation fedp2eft-structure (not a baseline) it wins 0, ties 0 and loses 4" in text

    run_dir = _write_run(tmp_path)
    config = {"name": "ablation", "model": "tiny", "dataset": "toy", "seeds": [0], "pools": ["seen", "unseen"],
              "methods": ["lora", "btlora", "fedp2eft-structure", "fedp2eft"], "budgets": [2, 8], "personalize": {}}
    write_report(config, run_dir, records, {"psg": 1.0}, "fedp2eft benchmark")
    report = (run_dir / "report.md").read_text()
    assert "(vs btlora)" in report and "(vs fedp2eft-structure)" not in report
    table = report[report.index("| FedP²EFT minus |"):]
    assert table.index("| btlora |") < table.index("| fedp2eft-structure (own ablation) |")


def test_a_reference_run_is_compared_cell_by_cell(tmp_path):
    """A run that names ``report.reference_run`` shows itself minus that run, paired by seed and client: here the
    reference's FedP²EFT is 6 points better per client (as in a DP run against the run without DP)."""
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "personalize.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    cheaper = _records(margin={"lora": 0, "fedp2eft": 0, "fedp2eft-structure": 3, "btlora": 1})
    run_dir = _write_run(tmp_path)
    config = {"name": "dp", "model": "tiny", "dataset": "toy", "seeds": [0, 1], "pools": ["seen", "unseen"],
              "methods": ["lora", "fedp2eft", "fedp2eft-structure", "btlora"], "budgets": [2, 8], "personalize": {},
              "report": {"reference_run": str(reference)}}
    write_report(config, run_dir, cheaper, {"psg": 1.0}, "fedp2eft benchmark")
    rows = {(r["method"], r["pool"], r["budget"]): r for r in
            json.loads((run_dir / "results.json").read_text())["against_reference"]}
    assert rows[("fedp2eft", "seen", 2)]["outcome"] == "loss" and rows[("lora", "seen", 2)]["difference"] == 0
    assert rows[("fedp2eft", "unseen", 8)]["difference"] == pytest.approx(-6 / 48)
    assert "## Against the reference run" in (run_dir / "report.md").read_text()


def test_the_heatmap_shows_every_language_at_the_most_varied_budget():
    from fedp2eft.benchmark.report.rank_maps import heatmap_budget, mean_rank_grid

    languages = tuple(f"l{i}" for i in range(10))
    records = _records(methods=("fedp2eft",), budgets=(2, 8), seeds=(0,), pools=("seen",), languages=languages)
    for record in records:
        for row in record["rows"]:
            if row["budget"] == 8:  # r = R: every module gets every rank, a flat and useless picture
                row["ranks"] = dict.fromkeys(MODULES, 8)
    assert heatmap_budget(records, [2, 8]) == 2
    shown, modules, grid = mean_rank_grid(records, 2)
    assert shown == sorted(languages) and grid.shape == (10, len(MODULES)) and grid.std() > 0


def test_per_language_differences_are_called_descriptive_with_few_clients_per_language():
    from fedp2eft.benchmark.report.tables import CLIENTS_FOR_LANGUAGE_CLAIMS, per_language_note

    rng = np.random.default_rng(1)
    few = {("seen", "lora", 2): _units(rng, clients=3), ("unseen", "lora", 2): _units(rng, clients=12)}
    assert "as few as 3 client(s) per language" in per_language_note(few)
    assert "descriptive" in per_language_note(few)
    many = {("seen", "lora", 2): _units(rng, clients=CLIENTS_FOR_LANGUAGE_CLAIMS)}
    assert per_language_note(many) == ""


def test_the_budget_diagnostic_says_whether_more_rank_buys_anything(tmp_path, capsys):
    """Uniform LoRA's gain from the smallest to the largest budget, paired over clients, decides the sentence: a
    user whose data does not reward rank is told to pick the cheapest budget, and where rank pays, a method that
    does not gain from it is named."""
    from fedp2eft.benchmark.report.budget import budget_effects, budget_verdict

    def effects(records):
        units = client_units(records)
        return budget_effects(units, summarize(records), ["seen", "unseen"], [2, 8],
                              ["base", "lora", "fedp2eft", "btlora"])

    flat = effects(_records(methods=("lora", "fedp2eft", "btlora")))
    lora = {e["pool"]: e for e in flat if e["method"] == "lora"}
    assert lora["seen"]["outcome"] == "tie" and (lora["seen"]["low"], lora["seen"]["high"]) == (2, 8)
    assert {e["method"] for e in flat} == {"lora", "fedp2eft", "btlora", "best"}  # base has no budget
    text = budget_verdict(flat)
    assert text.count("the budget does not bind") == 2 and "pick the cheapest budget (r=2)" in text

    binding = effects(_records(methods=("lora", "fedp2eft", "btlora"), budget_gain={"lora": 6, "btlora": 6}))
    lora = {e["pool"]: e for e in binding if e["method"] == "lora"}
    assert lora["unseen"]["outcome"] == "win" and lora["unseen"]["difference"] > 5 / 48
    best = next(e for e in binding if e["method"] == "best" and e["pool"] == "seen")
    assert (best["best_low"], best["best_high"]) == ("fedp2eft", "btlora")  # +6 at r=2; 1 + 6 > 6 at r=8
    text = budget_verdict(binding)
    assert text.count("the budget binds") == 2 and "fedp2eft gain nothing measurable" in text
    assert "cheapest" not in text

    # uniform rank buys nothing, but a method that allocates rank gains: said, with the envelope's caveat
    weak = budget_verdict(effects(_records(methods=("lora", "fedp2eft", "btlora"), budget_gain={"btlora": 12})))
    assert weak.count("binds only weakly") == 2 and "optimistic" in weak and "btlora at r=8" in weak

    alone = budget_verdict(effects(_records(methods=("lora",), budget_gain={"lora": 6})))
    assert "binds" in alone and "best method per budget" not in alone  # the envelope would repeat uniform LoRA

    hurting = budget_verdict(effects(_records(methods=("lora", "fedp2eft"), budget_gain={"lora": -6})))
    assert "more budget hurts" in hurting

    run_dir = _write_run(tmp_path)
    config = {"name": "mine", "model": "tiny", "dataset": "my.jsonl", "seeds": [0, 1], "pools": ["seen", "unseen"],
              "methods": ["lora", "fedp2eft", "btlora"], "budgets": [2, 8], "personalize": {}}
    write_report(config, run_dir, _records(methods=("lora", "fedp2eft", "btlora")), {"psg": 1.0}, "fedp2eft benchmark")
    assert "seen clients: the budget does not bind" in capsys.readouterr().out  # printed, not only written
    assert "## Does the budget bind?" in (run_dir / "report.md").read_text()
    saved = json.loads((run_dir / "results.json").read_text())["budget_effects"]
    assert {(e["pool"], e["method"]) for e in saved} == {(p, m) for p in ("seen", "unseen")
                                                         for m in ("lora", "fedp2eft", "btlora", "best")}


def test_fedl2ps_multipliers_say_whether_its_meta_nets_moved_the_rates():
    from fedp2eft.benchmark.report.fedl2p import fedl2p_markdown, fedl2p_rates

    records = _records(methods=("lora", "fedl2p"), budgets=(2, 8), seeds=(0,), pools=("seen",))
    for record in records:
        for row in record["rows"]:
            if row["method"] == "fedl2p":
                row.update(mean_lr=1e-3, multiplier_min=0.998, multiplier_max=1.004)
    entries = fedl2p_rates(records)
    assert [(e["budget"], e["runs"], e["flat"]) for e in entries] == [(2, 6, 6), (8, 6, 6)]
    assert "did not move the rates" in fedl2p_markdown(entries)
    records[0]["rows"][-1].update(multiplier_max=1.3)  # one run at r=8 got a rate of its own
    moved = fedl2p_rates(records)
    assert moved[1]["flat"] == 5 and moved[1]["multiplier_max"] == 1.3
    assert "In 1 of 12 runs some multiplier leaves 1 ± 1%" in fedl2p_markdown(moved)
    assert fedl2p_rates(_records(methods=("lora", "fedl2p"), seeds=(0,))) == []  # rows from before the fields


def test_fedl2ps_grid_says_which_meta_nets_early_stopping_kept(tmp_path):
    """From the logs of a FedL2P stage trained per meta learning rate: a point whose rounds never beat the first
    round's validation loss kept the untrained meta-nets; one that did kept those after the round before."""
    from fedp2eft.benchmark.report.fedl2p import fedl2p_grid, fedl2p_grid_markdown

    def rows(losses, multipliers):
        return [{"round": r + 1, "train/val_loss_before": loss, "train/mean_multiplier": m}
                for r, (loss, m) in enumerate(zip(losses, multipliers))]

    _write_metrics(tmp_path / "seed0" / "fedl2p" / "x3" / "metrics.jsonl", rows([1.9, 2.4, 1.8], [1.0, 1.01, 1.02]))
    _write_metrics(tmp_path / "seed0" / "fedl2p" / "x30" / "metrics.jsonl", rows([1.9, 2.6, 2.5], [1.5, 4.4, 7.0]))
    _write_metrics(tmp_path / "seed0" / "psg" / "metrics.jsonl", [{"round": 1}])
    entries = fedl2p_grid(tmp_path)
    assert [(e["point"], e["kept_after"]) for e in entries] == [(3.0, 2), (30.0, 0)]
    text = fedl2p_grid_markdown(entries)
    assert "| 0 | x30 | 1.900 (x1.50) | 2.600 (x4.40) | 2.500 (x7.00) | untrained |" in text
    assert "| after round 2 |" in text and "untrained meta-nets (every multiplier 1" in text and "1 of 2" in text
    assert fedl2p_grid(tmp_path / "seed0" / "psg") == []  # a stage trained once has no grid
    (tmp_path / "seed0" / "fedl2p" / "x30" / "metrics.jsonl").unlink()  # a published copy without that log
    assert [e["point"] for e in fedl2p_grid(tmp_path)] == [3.0]
