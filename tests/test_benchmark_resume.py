"""A benchmark interrupted during federated training stops at once and resumes from its last finished round, and
a run folder made with another config is refused instead of silently reused."""

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


def test_one_ctrl_c_stops_the_run_at_once_with_one_line_and_the_same_command_resumes_it(tmp_path):
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group, during the PS generator's federated stage,
    while the benchmark's workers (started for the learning-rate selection) and Ray's processes are alive. The
    command must exit with 130 within seconds, print one line naming the stage and how to resume (no traceback of
    any process), leave no process behind, and the same command must then finish the run from the last round. The
    command ends itself with ``os._exit`` after stopping its workers and Ray, so the run folder sees what a hard kill
    leaves (no code of ours runs after the signal besides the stop): this is also the resume-after-a-kill test."""
    psutil = pytest.importorskip("psutil")
    small = ["methods=[fedp2eft]", "budgets=[2]", "seeds=[0]", "pools=[unseen]", "psg.rounds=10"]
    command = [sys.executable, "-m", "fedp2eft.cli", "benchmark", "--config", "quick", "--results", str(tmp_path),
               *small]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    state = tmp_path / "quick" / "seed0" / "psg" / "state.json"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if state.exists() and json.loads(state.read_text())["round"] >= 1:
                break
            time.sleep(0.2)
        started = psutil.Process(process.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in started]
        os.killpg(process.pid, signal.SIGINT)
        sent = time.monotonic()
        _, err = process.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert any("multiprocessing" in line for line in commands), "no benchmark worker was running: test the stage"
    assert any("raylet" in line for line in commands), "Ray was not running: the interrupt missed the stage"
    assert process.returncode == 130, err
    assert took < 30, f"took {took:.0f} s to stop"
    stopped = [line for line in err.splitlines() if line.startswith("fedp2eft: stopped")]
    assert stopped == ["fedp2eft: stopped (interrupted) during the psg stage; the same command resumes the run there "
                       "(finished stages, rounds and clients are kept)"], err
    assert not any(word in err for word in ("Traceback", "KeyboardInterrupt", "Error")), err
    gone = psutil.wait_procs(started, timeout=10)[1]
    assert not [p for p in gone if p.status() != psutil.STATUS_ZOMBIE], "processes outlived the command"
    stopped_at = json.loads(state.read_text())["round"]
    assert 1 <= stopped_at < 10 and not (tmp_path / "quick" / "seed0" / "psg" / "export.json").exists()

    assert main(["benchmark", "--config", "quick", "--results", str(tmp_path), *small]) == 0
    rounds = [json.loads(line)["round"] for line in (tmp_path / "quick" / "seed0" / "psg" / "metrics.jsonl")
              .read_text().splitlines()]
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
    from fedp2eft.benchmark.run_folder import check_run_folder

    check_run_folder(run, resolve("quick", [*SMALL, "workers=1"]))  # how fast, not what: accepted
    # a run made before generation_tokens existed resumes: a key it lacks counts as the key's default
    older = resolve("quick", SMALL)
    del older["generation_tokens"]
    (run / "config.yaml").write_text(yaml.safe_dump(older))
    check_run_folder(run, resolve("quick", SMALL))
    with pytest.raises(FedP2EFTError, match="differs in: generation_tokens"):
        check_run_folder(run, resolve("quick", [*SMALL, "generation_tokens=4"]))
    # a run made before precision existed computed in float32: it resumes in fp32 and is refused in bf16, as is a
    # run whose `auto` meant bf16 on its machine and fp32 on this one
    del older["precision"]
    (run / "config.yaml").write_text(yaml.safe_dump(older))
    check_run_folder(run, resolve("quick", [*SMALL, "precision=fp32"]))
    with pytest.raises(FedP2EFTError, match="differs in: precision"):
        check_run_folder(run, resolve("quick", [*SMALL, "precision=bf16"]))
    # federated stages checkpoint their task config: a default-valued new key stays out of it, so they resume too
    from fedp2eft.benchmark.run_folder import task_config

    assert "generation_tokens" not in task_config(resolve("quick", SMALL), "m", {})
    assert task_config(resolve("quick", [*SMALL, "generation_tokens=4"]), "m", {})["generation_tokens"] == 4


@pytest.mark.parametrize("cut", ['{"seed": 0, "pool"', ""])
def test_a_results_file_cut_by_a_kill_keeps_its_complete_lines(tmp_path, caplog, cut):
    from fedp2eft.benchmark.run_folder import read_jsonl

    path = tmp_path / "personalize.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n' + cut)
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ([f"{path}: dropped its last line, cut off when the run was killed; that work is redone"]
                      if cut else [])
