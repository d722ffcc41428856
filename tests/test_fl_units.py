"""Fast checks of the Flower layer's pure parts: task resolution, job validation, reply checks, FedAvg."""

from __future__ import annotations

import json

import pytest
import torch

from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl.job import Job
from fedp2eft.fl.server_app import sample_clients
from fedp2eft.fl.tasks import build_task
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedp2eft.fl import protocol as P
from fedp2eft.fl.aggregation import aggregate, make_strategy
from fedp2eft.fl.weights import from_record, to_record, update_problem

JOB = {"task": "toy", "output_dir": "/tmp/x", "rounds": 2, "clients_per_round": 2}


def test_build_task_resolves_builtin_and_dotted_paths() -> None:
    assert build_task("toy", {"num_clients": 3}).num_clients() == 3
    assert build_task("fedp2eft.fl.toy_task:make_task", {"num_clients": 5}).num_clients() == 5
    with pytest.raises(FedP2EFTError, match=r"unknown task 'nope': use one of \['base', 'fedl2p', 'flexlora', 'hetlora', 'nested', 'psg', 'toy'\]"):
        build_task("nope", {})
    with pytest.raises(FedP2EFTError, match="cannot import task module"):
        build_task("no_such_module_xyz:make_task", {})
    with pytest.raises(FedP2EFTError, match="does not exist"):
        build_task("fedp2eft.fl.toy_task:missing", {})
    with pytest.raises(FedP2EFTError, match="lacks"):
        build_task("builtins:dict", {})


def test_a_resume_may_change_the_device_but_not_the_task_config() -> None:
    job = Job.from_dict({**JOB, "task_config": {"num_clients": 3, "device": "cpu"}})
    assert job.trajectory() == Job.from_dict({**JOB, "task_config": {"num_clients": 3, "device": "cuda"}}).trajectory()
    assert job.trajectory() != Job.from_dict({**JOB, "task_config": {"num_clients": 4, "device": "cpu"}}).trajectory()


def test_job_round_trips_and_rejects_bad_values() -> None:
    job = Job.from_run_config({"job": json.dumps(JOB)})
    assert Job.from_json(job.to_json()) == job
    with pytest.raises(FedP2EFTError, match="no 'job'"):
        Job.from_run_config({})
    with pytest.raises(FedP2EFTError, match="not valid JSON"):
        Job.from_run_config({"job": "{"})
    with pytest.raises(FedP2EFTError, match="unknown job keys"):
        Job.from_dict({**JOB, "round": 3})
    with pytest.raises(FedP2EFTError, match="min_clients"):
        Job.from_dict({**JOB, "min_clients": 3})
    with pytest.raises(FedP2EFTError, match="rounds must be a positive integer"):
        Job.from_dict({**JOB, "rounds": 0})
    with pytest.raises(FedP2EFTError, match="seed must be a non-negative integer"):
        Job.from_dict({**JOB, "seed": -1})
    with pytest.raises(FedP2EFTError, match="required keys"):
        Job.from_dict({"task": "toy"})


def test_update_checks_and_weighted_average(monkeypatch: pytest.MonkeyPatch) -> None:
    ref = {"w": torch.zeros(2, 2), "steps": torch.tensor(7)}
    assert update_problem(ref, {"w": torch.ones(2, 2), "steps": torch.tensor(1)}) is None
    assert "shape" in update_problem(ref, {"w": torch.ones(3), "steps": torch.tensor(1)})
    assert "NaN" in update_problem(ref, {"w": torch.full((2, 2), float("inf")), "steps": torch.tensor(1)})
    assert "keys differ" in update_problem(ref, {"w": torch.ones(2, 2)})
    assert "dtype" in update_problem(ref, {"w": torch.ones(2, 2, dtype=torch.float64), "steps": torch.tensor(1)})
    for field in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp's run sets before it makes messages
        monkeypatch.setattr(TaskIdentity, field, 1)
    replies = [Message(RecordDict({P.WEIGHTS: to_record(weights), P.METRICS: MetricRecord({P.NUM_EXAMPLES: n})}),
                       dst_node_id=1, message_type=P.TRAIN)
               for weights, n in (({"w": torch.ones(2, 2), "steps": torch.tensor(1)}, 1),
                                  ({"w": torch.full((2, 2), 4.0), "steps": torch.tensor(2)}, 3))]
    avg = aggregate(make_strategy("fedavg"), 1, ref, replies)
    assert torch.equal(avg["w"], torch.full((2, 2), 3.25)) and avg["w"].dtype == torch.float32
    assert int(avg["steps"]) == 7  # integer buffers keep the global value
    restored = from_record(to_record(avg))
    assert all(torch.equal(restored[k], avg[k]) for k in avg)


def test_client_sampling_is_deterministic_per_seed_and_round() -> None:
    available = list(range(10))
    first = sample_clients(available, 4, seed=1, server_round=3)
    assert first == sample_clients(available, 4, seed=1, server_round=3)
    assert len(set(first)) == 4 and first == sorted(first)
    others = {tuple(sample_clients(available, 4, seed=1, server_round=r)) for r in range(1, 8)}
    assert len(others) > 1
    assert sample_clients([2, 5], 4, seed=0, server_round=1) == [2, 5]


def test_every_method_stage_gets_a_train_command(capsys) -> None:
    from fedp2eft.cli import main
    from fedp2eft.core.methods import STAGES

    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    listed = capsys.readouterr().out
    assert "train-base" in listed and all(f"train-{name}" in listed for name in STAGES) and "train-fedl2p" in listed


def test_client_failures_are_summarized_once_each_in_one_line() -> None:
    from fedp2eft.fl.round_outcome import failure_summary, one_line

    remote = ("Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n    raise ValueError('bad lr')\n"
              "ValueError: could not convert string to float: '1e-4'\n")
    assert one_line(remote) == "ValueError: could not convert string to float: '1e-4'"
    assert one_line("no reply before the round timeout") == "no reply before the round timeout"
    assert len(one_line("x" * 1000)) == 300
    failures = [{"client": c, "reason": one_line(remote)} for c in (4, 1)] + [{"client": 2, "reason": "timeout"}]
    assert failure_summary(failures) == ("ValueError: could not convert string to float: '1e-4' (clients 1, 4); "
                                         "timeout (client 2)")
