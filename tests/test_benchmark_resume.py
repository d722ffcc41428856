"""A benchmark killed during federated training resumes from its last finished round, and a run folder made
with another config is refused instead of silently reused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedp2eft.cli import main
from fedp2eft.errors import FedP2EFTError

SMALL = ["methods=[lora]", "budgets=[2]", "seeds=[0]", "pools=[unseen]", "selection.grid=[3.0]", "base.rounds=4"]


def test_a_run_killed_during_base_training_resumes(tmp_path):
    """The kill lands some time after round 1 is seen on disk. With ten rounds (not four) the run is still in federated
    training nine rounds later, so a test process starved of the CPU between seeing round 1 and killing still kills it
    there, not after the stage has finished."""
    small = [*SMALL[:-1], "base.rounds=10"]
    command = [sys.executable, "-m", "fedp2eft.cli", "benchmark", "--config", "quick", "--results", str(tmp_path),
               *small]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = tmp_path / "quick" / "base" / "state.json"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if state.exists() and json.loads(state.read_text())["round"] >= 1:
                break
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = json.loads(state.read_text())["round"]
    assert 1 <= killed_at < 10, "the run was not killed during federated training"
    assert not (tmp_path / "quick" / "base" / "model").exists()

    assert main(["benchmark", "--config", "quick", "--results", str(tmp_path), *small]) == 0
    rounds = [json.loads(line)["round"] for line in (tmp_path / "quick" / "base" / "metrics.jsonl").read_text()
              .splitlines()]
    assert rounds == list(range(1, 11))
    assert (tmp_path / "quick" / "report.md").is_file()


def test_a_changed_config_is_refused_and_runtime_keys_are_not(tmp_path, capsys):
    run = tmp_path / "quick"
    run.mkdir()
    from fedp2eft.benchmark.config import resolve
    import yaml

    (run / "config.yaml").write_text(yaml.safe_dump(resolve("quick", SMALL)))
    assert main(["benchmark", "--config", "quick", "--results", str(tmp_path), *SMALL[:-1], "base.rounds=5"]) == 2
    err = capsys.readouterr().err
    assert "another config" in err and "base" in err and "name=" in err
    from fedp2eft.benchmark.runner import check_run_folder

    check_run_folder(run, resolve("quick", [*SMALL, "workers=1"]))  # how fast, not what: accepted
    # a run made before generation_tokens existed resumes: a key it lacks counts as the key's default
    older = resolve("quick", SMALL)
    del older["generation_tokens"]
    (run / "config.yaml").write_text(yaml.safe_dump(older))
    check_run_folder(run, resolve("quick", SMALL))
    with pytest.raises(FedP2EFTError, match="differs in: generation_tokens"):
        check_run_folder(run, resolve("quick", [*SMALL, "generation_tokens=4"]))
    # federated stages checkpoint their task config: a default-valued new key stays out of it, so they resume too
    from fedp2eft.benchmark.runner import task_config

    assert "generation_tokens" not in task_config(resolve("quick", SMALL), "m", {})
    assert task_config(resolve("quick", [*SMALL, "generation_tokens=4"]), "m", {})["generation_tokens"] == 4


@pytest.mark.parametrize("cut", ['{"seed": 0, "pool"', ""])
def test_a_results_file_cut_by_a_kill_keeps_its_complete_lines(tmp_path, caplog, cut):
    from fedp2eft.benchmark.runner import read_jsonl

    path = tmp_path / "personalize.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n' + cut)
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ([f"{path}: dropped its last line, cut off when the run was killed; that work is redone"]
                      if cut else [])
