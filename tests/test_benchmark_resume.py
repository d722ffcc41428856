"""A benchmark interrupted during federated training stops at once and resumes from its last finished round, and
a run folder made with another config is refused instead of silently reused."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from fedp2eft.cli import main
from fedp2eft.errors import FedP2EFTError

SMALL = ["methods=[lora]", "budgets=[2]", "seeds=[0]", "pools=[unseen]", "selection.grid=[3.0]", "base.rounds=4"]


def interrupt_when(command: list[str], ready, stage_pattern: str) -> list[str]:
    """Start ``command`` in its own process group, wait until ``ready(children's command lines)`` holds, and send
    SIGINT to the whole group, as a terminal's Ctrl-C does. The command must exit with 130 within seconds, print one
    line naming a stage that matches ``stage_pattern`` and how to resume (no traceback of any process), and leave no
    process behind. Returns the command lines of the processes that were running when the signal went out."""
    psutil = pytest.importorskip("psutil")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        started, commands = [], []
        while time.monotonic() < deadline and process.poll() is None:
            try:
                started = psutil.Process(process.pid).children(recursive=True)
                commands = [" ".join(child.cmdline()) for child in started]
            except psutil.Error:  # a child ended while being read: look again
                continue
            if ready(commands):
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before the moment to interrupt it"
        os.killpg(process.pid, signal.SIGINT)
        sent = time.monotonic()
        _, err = process.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, err
    assert took < 30, f"took {took:.0f} s to stop"
    stopped = [line for line in err.splitlines() if line.startswith("fedp2eft: stopped")]
    assert len(stopped) == 1 and re.fullmatch(
        f"fedp2eft: stopped \\(interrupted\\) during the {stage_pattern} stage; the same command resumes the run "
        "there \\(finished stages, rounds and clients are kept\\)", stopped[0]), err
    assert not any(word in err for word in ("Traceback", "KeyboardInterrupt", "Error")), err
    gone = psutil.wait_procs(started, timeout=10)[1]
    assert not [p for p in gone if p.status() != psutil.STATUS_ZOMBIE], "processes outlived the command"
    return commands


def test_ctrl_c_stops_the_run_at_once_with_one_line_and_the_same_command_resumes_it(tmp_path):
    """Ctrl-C as a terminal sends it, twice: during the PS generator's federated stage (Ray's processes alive, the
    benchmark's workers released so that their memory goes to Flower's clients), and, started again, during a
    per-client stage (the workers alive; Ray gone); the same command then finishes the run from where it stopped.
    The command ends itself with ``os._exit`` after stopping its workers and Ray, so the run folder sees what a hard
    kill leaves (no code of ours runs after the signal besides the stop): this is also the resume-after-a-kill
    test."""
    # lora's learning-rate selection starts the workers before the generator's stage, which must release them
    small = ["methods=[lora,fedp2eft]", "budgets=[2]", "seeds=[0]", "pools=[unseen]", "psg.rounds=5"]
    command = [sys.executable, "-m", "fedp2eft.cli", "benchmark", "--config", "quick", "--results", str(tmp_path),
               *small]
    psg = tmp_path / "quick" / "seed0" / "psg"

    def in_federated_stage(_: list[str]) -> bool:
        return (psg / "state.json").exists() and json.loads((psg / "state.json").read_text())["round"] >= 1

    commands = interrupt_when(command, in_federated_stage, "psg")
    assert (tmp_path / "quick" / "selection.jsonl").read_text().count("\n") == 2  # both validation clients, by workers
    assert any("raylet" in line for line in commands), "Ray was not running: the interrupt missed the stage"
    assert not any("spawn_main" in line for line in commands), "the benchmark's workers stayed during Flower's stage"
    stopped_at = json.loads((psg / "state.json").read_text())["round"]
    assert 1 <= stopped_at < 5 and not (psg / "export.json").exists()

    def workers_busy(lines: list[str]) -> bool:
        return (psg / "export.json").exists() and any("spawn_main" in line for line in lines)

    commands = interrupt_when(command, workers_busy, "(select|personalize)")
    assert not any("raylet" in line for line in commands)

    assert main(["benchmark", "--config", "quick", "--results", str(tmp_path), *small]) == 0
    rounds = [json.loads(line)["round"] for line in (psg / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, 6))
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
