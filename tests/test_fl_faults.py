"""Faulty clients inside the Ray simulation: they are left out, the round completes, and too few
successes stop the run with a clear error while the last good checkpoint stays intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import npy_bytes
from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl.simulation import run_federated
from fedp2eft.fl.toy_task import make_task as make_toy_task

TOY = {"num_clients": 6, "dim": 4, "hidden": 4, "local_steps": 2, "seed": 3}
# Round 1: clients 1-5 misbehave in five different ways, client 0 is healthy.
# Round 2: client 0 also fails, so no client succeeds and min_clients=1 is missed.
FAULTS = {"0": "raise@2", "1": "raise", "2": "nan", "3": "shape", "4": "missing", "5": "sleep"}


def test_faulty_clients_are_excluded_then_too_few_stops_the_run(tmp_path: Path) -> None:
    # The round waits for the sleeper until the timeout. The healthy client needs the timeout to cover a Ray
    # actor's first ClientApp load (seconds on a busy machine), so the timeout is generous, and the sleeper sleeps
    # well past it, however late its message reaches it.
    config = {**TOY, "faults": FAULTS, "sleep_s": 45.0}
    with pytest.raises(FedP2EFTError, match=r"round 2: only 0 of 6 sampled clients succeeded.*min_clients=1") as stop:
        run_federated("fl_tasks:make_task", config, 3, 6, output_dir=tmp_path, min_clients=1, round_timeout_s=20.0)
    # each distinct failure once, in one line, with the clients it hit; the full remote reasons go to a file
    message = str(stop.value)
    assert "\n" not in message and message.count("scripted failure of client 0") == 1
    assert "client_errors.log" in message and "(clients 2, 3, 4, 5)" not in message
    errors = (tmp_path / "client_errors.log").read_text()
    assert "=== round 1, client 1" in errors and "=== round 2, client 0" in errors

    state = json.loads((tmp_path / "state.json").read_text())
    assert state["round"] == 1  # round 2 was never recorded
    (row,) = state["history"]
    assert row["successes"] == 1 and row["failures"] == 5 and row["clients"] == [0]
    reasons = {f["client"]: f["reason"] for f in row["failed"]}
    assert "scripted failure of client 1" in reasons[1]
    assert "NaN" in reasons[2]
    assert "shape" in reasons[3]
    assert "keys differ" in reasons[4]
    assert "timeout" in reasons[5]

    # every reply that arrived counts as received, a refused one too; an error or no reply moves no weights
    toy = make_toy_task(TOY)
    weights = toy.initial_weights()
    first = sorted(weights)[0]  # the tensor the scripted faults change
    size = npy_bytes(weights)
    received = {int(c): t["received"] for c, t in row["bytes_by_client"].items()}
    assert received == {0: size, 1: 0, 2: size, 3: npy_bytes({**weights, first: torch.zeros(3, 3, 3)}),
                        4: npy_bytes({k: v for k, v in weights.items() if k != first}), 5: 0}
    assert row["bytes_received"] == sum(received.values())
    assert row["bytes_sent"] == 6 * size and {t["sent"] for t in row["bytes_by_client"].values()} == {size}

    # The aggregate of round 1 is client 0's update alone, and it is the checkpoint on disk.
    expected = toy.client_update(toy.initial_weights(), 0, 1).weights
    saved = load_file(str(tmp_path / state["checkpoint"]))
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name], tensor, atol=1e-6, rtol=0)
    assert len(list(tmp_path.glob("global-round*.safetensors"))) == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
