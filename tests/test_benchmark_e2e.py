"""End to end on the embedded model and data: the quick profile runs every stage, writes the report, resumes
without redoing work, and never lets an unseen client into base-model or generator training."""

import json

from fedp2eft.benchmark.config import resolve
from fedp2eft.cli import main
from fedp2eft.core.methods import METHODS
from fedp2eft.data.registry import load_dataset
from fedp2eft.experiment import make_stage_task


def test_quick_profile_writes_the_full_report(quick_run):
    config = resolve("quick", [])
    for name in ["report.md", "results.json", "results.csv", "config.yaml", "figures/accuracy_vs_budget.png",
                 "figures/rank_heatmap.png", "figures/psg_training.png", "seed0/psg/generator.safetensors",
                 "seed1/psg/generator.safetensors", "base/model/config.json", "selection.json",
                 "seed0/fedl2p/x3/fedl2p-r2.safetensors", "seed0/fedl2p/x30/fedl2p-r8.safetensors",
                 "seed0/fedl2p/x3/best.safetensors"]:
        assert (quick_run / name).is_file(), name
    # FedL2P's seed 0 is trained at every point of the grid (its meta learning rate is selected on them); seed 1
    # only at the points chosen
    selection = json.loads((quick_run / "selection.json").read_text())
    chosen = {float(scale) for scale in selection["chosen"]["fedl2p"].values()}
    assert {p.name for p in (quick_run / "seed1" / "fedl2p").glob("x*")} == {f"x{scale:g}" for scale in chosen}
    summary = json.loads((quick_run / "results.json").read_text())["summary"]
    settings = {(row["pool"], row["method"], row["budget"]) for row in summary}
    expected = {(p, m, b) for p in config["pools"] for m in config["methods"] for b in config["budgets"]}
    assert expected | {(p, "base", 0) for p in config["pools"]} == settings
    assert all(0.0 <= row["ci_low"] <= row["mean"] <= row["ci_high"] <= 1.0 for row in summary)
    report = (quick_run / "report.md").read_text()
    assert "Does FedP²EFT win?" in report and "r=8" in report and "Learning-rate selection" in report
    communication = json.loads((quick_run / "results.json").read_text())["communication"]
    assert set(communication["stages"]) == {"base", "psg", "fedl2p"} and "## Communication" in report
    assert communication["stages"]["psg"]["runs"] == len(config["seeds"])
    adapters = communication["adapters"]  # the module shapes came from the run's own base checkpoint
    assert adapters["adapters"] == len(config["seeds"]) * len(config["budgets"]) * sum(
        len(getattr(load_dataset(config["dataset"], **config["dataset_options"]), pool)) for pool in config["pools"])
    assert adapters["bytes"] > 0


def test_learning_rates_are_chosen_on_validation_data_only(quick_run):
    """Every method and budget got a scale from the grid, chosen on the training data of clients the base model
    never saw (the profile's selection pool): no test example was scored to choose."""
    config = resolve("quick", [])
    selection = json.loads((quick_run / "selection.json").read_text())
    # FedL2P learns its own learning rates; its meta learning rate is selected on the same grid (select_on_grid)
    assert config["fedl2p"]["select_on_grid"] and METHODS["fedl2p"].lr_field is None
    assert set(selection["chosen"]) == {m for m in config["methods"] if METHODS[m].lr_field is not None} | {"fedl2p"}
    assert selection["rate_of"] == {"fedl2p": "fedl2p.training.meta_lr"}
    meta_lr = config["fedl2p"]["training"]["meta_lr"]
    assert {(row["scale"], row["lr"]) for row in selection["results"] if row["method"] == "fedl2p"} == {
        (scale, meta_lr * scale) for scale in config["selection"]["grid"]}
    assert all(set(map(int, by_budget)) == set(config["budgets"]) for by_budget in selection["chosen"].values())
    assert all(row["scale"] in config["selection"]["grid"] for row in selection["results"])
    assert config["selection"]["pool"] == "unseen"
    assert all(client.split("-")[-1].startswith("u") for client in selection["clients"])
    data = load_dataset(config["dataset"], **config["dataset_options"])
    seen = {c.client_id: c for c in data.unseen}
    count = sum(row["val_count"] for row in selection["results"] if row["method"] == "lora" and row["budget"] == 2
                and row["scale"] == config["selection"]["grid"][0])
    fraction = config["selection"]["validation_fraction"]
    assert count == sum(max(1, round(fraction * len(seen[c].train))) for c in selection["clients"])
    records = [json.loads(line) for line in (quick_run / "personalize.jsonl").read_text().splitlines()]
    for record in records:
        for row in record["rows"]:
            if row["method"] == "fedl2p":
                assert row["lr"] is None and row["mean_lr"] > 0
            if row["method"] != "base":
                assert row["lr_scale"] == selection["chosen"][row["method"]][str(row["budget"])]


def test_structure_variant_uses_fedp2eft_ranks_with_unit_lambdas(quick_run):
    records = [json.loads(line) for line in (quick_run / "personalize.jsonl").read_text().splitlines()]
    for record in records:
        rows = {(row["method"], row["budget"]): row for row in record["rows"]}
        for budget in resolve("quick", [])["budgets"]:
            assert rows[("fedp2eft-structure", budget)]["ranks"] == rows[("fedp2eft", budget)]["ranks"]
            assert sum(len(v) for v in rows[("fedp2eft", budget)]["lambdas"].values()) == budget * 72


def test_rerun_resumes_without_redoing_stages(quick_run):
    rows_before = (quick_run / "personalize.jsonl").read_text()
    generator_before = (quick_run / "seed1" / "psg" / "generator.safetensors").stat().st_mtime_ns
    assert main(["benchmark", "--config", "quick", "--results", str(quick_run.parent), "precision=fp32"]) == 0
    assert (quick_run / "personalize.jsonl").read_text() == rows_before
    assert (quick_run / "seed1" / "psg" / "generator.safetensors").stat().st_mtime_ns == generator_before


def test_unseen_clients_never_train_the_generator_or_base(quick_run):
    config = resolve("quick", [])
    data = load_dataset(config["dataset"], **config["dataset_options"])
    seen, unseen = {c.client_id for c in data.seen}, {c.client_id for c in data.unseen}
    assert seen and unseen and not seen & unseen
    task = make_stage_task("psg", {"model": str(quick_run / "base" / "model"), "dataset": config["dataset"],
                                   "dataset_options": config["dataset_options"],
                                   "training": {"personalize": {"max_rank": 8}}})
    assert {c.client_id for c in task.clients} == seen
    logs = [quick_run / stage / "metrics.jsonl" for stage in ("base", "seed0/psg", "seed1/psg")]
    logs += sorted(quick_run.glob("seed*/fedl2p/x*/metrics.jsonl"))
    assert len(logs) >= 3 + len(config["selection"]["grid"]) + 1
    for path in logs:
        for line in path.read_text().splitlines():
            assert all(0 <= index < len(data.seen) for index in json.loads(line)["clients"])


def test_bad_config_fails_before_work(tmp_path, capsys):
    assert main(["benchmark", "--config", "quick", "--results", str(tmp_path), "methods=[lorax]"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_personalize_command_rebuilds_a_cell_of_the_run(quick_run, tmp_path, capsys):
    """FedL2P's artifact is a folder of meta-nets; the command finds the run's and reproduces its row."""
    args = ["personalize", "--run", str(quick_run), "--client", "en-u0", "--method", "fedl2p", "--budget", "2",
            "--export", str(tmp_path / "adapter")]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (quick_run / "personalize.jsonl").read_text().splitlines()]
    record = next(r for r in records if (r["seed"], r["client"]) == (0, "en-u0"))
    row = next(row for row in record["rows"] if (row["method"], row["budget"]) == ("fedl2p", 2))
    assert (report["correct"], report["count"], report["mean_lr"]) == (row["correct"], row["count"], row["mean_lr"])
    assert report["lora_ranks_total"] == 2 * 72
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_the_readme_python_example_runs_as_written(quick_run, tmp_path, monkeypatch, capsys):
    """The README's Python block, executed verbatim next to a ``results/quick`` run folder."""
    import re
    from pathlib import Path

    from peft import PeftConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "results").symlink_to(quick_run.parent, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert "accuracy" in capsys.readouterr().out
    adapter = PeftConfig.from_pretrained(str(tmp_path / "my-adapter"))
    assert adapter.peft_type == "LORA" and "quick/base/model" in adapter.base_model_name_or_path


def test_a_finished_run_reports_again_from_its_own_files(quick_run, tmp_path, capsys):
    """`fedp2eft report` writes a run's report again with this version and trains nothing: a published copy
    without its base checkpoint and stage logs keeps the bytes its earlier report recorded and sizes adapters from
    the configured model's shapes; the budget diagnostic is printed."""
    import shutil

    copy = tmp_path / "published"
    shutil.copytree(quick_run, copy, ignore=shutil.ignore_patterns("base", "*.safetensors", "metrics.jsonl"))
    before = json.loads((quick_run / "results.json").read_text())
    assert main(["report", str(copy)]) == 0
    printed = capsys.readouterr().out
    assert "budget" in printed and "report:" in printed
    report = (copy / "report.md").read_text()
    assert "written again from the run's own records by `fedp2eft report" in report
    assert "## Does the budget bind?" in report and "| FedP²EFT minus the best baseline |" in report
    after = json.loads((copy / "results.json").read_text())
    assert after["summary"] == before["summary"] and after["command"] == before["command"]
    assert after["communication"]["stages"] == before["communication"]["stages"]
    assert after["communication"]["adapters"] == before["communication"]["adapters"]
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a benchmark run folder (no config.yaml)" in capsys.readouterr().err
