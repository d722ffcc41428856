"""`fedp2eft personalize --run` rebuilds one cell of a benchmark run for one client: it prints the run's row for
that client (score, correct, count) and exports the adapter behind it; without --run the settings are the default
profile's. The run is the quick profile's, shared with the end-to-end tests (conftest.py)."""

import json
import shlex
from pathlib import Path

import pytest
from peft import PeftModel

from conftest import TRAINED_LOSS_REL
from fedp2eft.benchmark.config import resolve
from fedp2eft.benchmark.run_folder import run_config, task_config
from fedp2eft.cli import build_parser, main
from fedp2eft.commands.personalize import command_config, max_rank_of
from fedp2eft.experiment import Setup

BUDGET = 8  # the README's example budget, one of the quick profile's
assert BUDGET in resolve("quick", [])["budgets"]


def run_row(run: Path, pool: str, method: str, client: str | None = None) -> tuple[str, dict]:
    """(client id, row) for ``method`` at ``BUDGET`` in the run's personalize.jsonl, of its first seed (the
    command's default): of ``client``, or of the client of ``pool`` whose row scored best (so that a score of zero
    cannot hide a difference)."""
    records = [json.loads(line) for line in (run / "personalize.jsonl").read_text().splitlines()]
    rows = [(r["client"], next(row for row in r["rows"] if (row["method"], row["budget"]) == (method, BUDGET)))
            for r in records if r["seed"] == 0 and r["pool"] == pool and client in (None, r["client"])]
    return max(rows, key=lambda pair: pair[1]["correct"])


def personalize(capsys, *words: str) -> dict:
    assert main(["personalize", *words]) == 0
    return json.loads(capsys.readouterr().out)


def without_time(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "seconds"}


@pytest.mark.parametrize("method", ["lora", "btlora", "fedp2eft"])
@pytest.mark.parametrize("pool", ["seen", "unseen"])
def test_the_command_reproduces_the_runs_row(quick_run, tmp_path, capsys, method, pool):
    client, row = run_row(quick_run, pool, method)
    report = personalize(capsys, "--run", str(quick_run), "--client", client, "--method", method,
                         "--budget", str(BUDGET), "--export", str(tmp_path / "adapter"))
    assert (report["score"], report["correct"], report["count"]) == (row["score"], row["correct"], row["count"])
    # the same computation to float rounding (the run trained the cell together with the client's other cells in one
    # pass, core/multi_lora.py): learning rate and ranks exactly; the training loss (a mean of a few hundred float32
    # terms) and the kept lambdas (6 digits) to rounding
    rounded = ("train_loss_last_epoch", "lambdas")
    assert without_time({key: report[key] for key in row if key not in rounded}) == \
        without_time({key: value for key, value in row.items() if key not in rounded}) and report["pool"] == pool
    assert report["train_loss_last_epoch"] == pytest.approx(row["train_loss_last_epoch"], rel=TRAINED_LOSS_REL)
    for name, values in row.get("lambdas", {}).items():
        assert report["lambdas"][name] == pytest.approx(values, abs=2e-6)
    # the exported adapter (it carries the head), loaded onto the run's plain base model, scores the run's row
    setup = Setup.from_config(task_config(run_config(quick_run), str(quick_run / "base" / "model"), {}))
    test = next(c for c in setup.data.pool(pool) if c.client_id == client).test
    adapter = PeftModel.from_pretrained(setup.load_base_model(), report["adapter"])
    assert list(setup.task.evaluate(adapter, test)["scores"][row["metric"]]) == [row["correct"], row["count"]]


def test_the_readme_example_runs_as_written(quick_run, tmp_path, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("fedp2eft personalize "))
    words = shlex.split(line.replace("results/default", str(quick_run)).replace("my-adapter", str(tmp_path / "a")))
    report = personalize(capsys, *words[2:])
    _, row = run_row(quick_run, report["pool"], report["method"], report["client"])
    assert without_time({key: report[key] for key in row}) == without_time(row)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["modules_to_save"] == ["head"]


@pytest.mark.parametrize("words, message", [
    (["--client", "xx-u9", "--method", "lora", "--budget", str(BUDGET)], "no client 'xx-u9' in intents with options"),
    (["--client", "en-u0", "--method", "lora", "--budget", "4"], "chose no learning rate for lora at budget(s) [4]"),
])
def test_a_cell_the_run_cannot_rebuild_is_refused(quick_run, capsys, words, message):
    assert main(["personalize", "--run", str(quick_run), *words]) == 2
    err = capsys.readouterr().err
    assert message in err and "\n" == err[-1] and err.count("\n") == 1
    if "xx-u9" in words:
        assert "seen: en-s0, hi-s0; unseen: en-u0, hi-u0" in err


def test_a_run_base_with_the_default_profiles_data_is_refused(quick_run, capsys):
    """The issue's trap: a quick base with the default data used to pick a client of other data, with a random head."""
    model = str(quick_run / "base" / "model")
    assert main(["personalize", "--model", model, "--client", "hi-u0", "--method", "lora", "--budget", "2"]) == 2
    assert "has a classification head for labels" in capsys.readouterr().err


def test_without_a_run_the_settings_are_the_default_profiles(quick_run, tmp_path, capsys):
    profile = resolve("default", [])
    args = build_parser().parse_args(["personalize", "--model", "m", "--client", "c"])
    config = command_config(args)
    assert {k: config[k] for k in ("dataset", "dataset_options", "max_length", "personalize", "device")} == \
        {k: profile[k] for k in ("dataset", "dataset_options", "max_length", "personalize", "device")}
    assert max_rank_of(args, config, None) == profile["personalize"]["max_rank"]
    generator = quick_run / "seed0" / "psg" / "generator.safetensors"
    args = build_parser().parse_args(["personalize", "--model", "m", "--client", "c", "--artifact", str(generator)])
    assert max_rank_of(args, config, generator) == run_config(quick_run)["personalize"]["max_rank"] == 8
    assert main(["personalize", "--client", "c"]) == 2
    assert "give --run" in capsys.readouterr().err
    assert main(["personalize", "--run", str(tmp_path), "--client", "c"]) == 2
    assert "not a benchmark run folder (no config.yaml)" in capsys.readouterr().err
