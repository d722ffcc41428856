"""Client state in Flower: a stateful task's clients keep their own tensors across rounds (``Context.state``,
with files under the run's ``clients`` folder as the client-side checkpoint), never send them, and a killed run
resumes from exactly the state the server's checkpoint assumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TOY_CONFIG
from fedp2eft.core.client_state import ClientStateStore
from fedp2eft.fl.server_app import sample_clients
from fedp2eft.fl.simulation import run_federated
from fedp2eft.fl.toy_task import make_task

STATEFUL = {**TOY_CONFIG, "local_offset": True}
ROUNDS, PER_ROUND, SEED = 3, 2, 5


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / json.loads((out / "state.json").read_text())["checkpoint"]))


@pytest.fixture(scope="module")
def stateful_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stateful")
    run_federated("toy", STATEFUL, ROUNDS, PER_ROUND, output_dir=out, min_clients=1, seed=SEED)
    return out


def test_each_client_continues_from_its_own_state_and_never_sends_it(stateful_run: Path) -> None:
    task = make_task(STATEFUL)
    weights, states = task.initial_weights(), {}
    for row in rows(stateful_run):
        clients = sample_clients(list(range(task.num_clients())), PER_ROUND, SEED, row["round"])
        assert row["clients"] == clients
        updates = {c: task.client_update(weights, c, row["round"], states.get(c)) for c in clients}
        total = sum(u.num_examples for u in updates.values())
        weights = {k: (sum(u.weights[k].double() * u.num_examples for u in updates.values()) / total).float()
                   for k in weights}
        states.update({c: u.state for c, u in updates.items()})
        assert row["bytes_received"] == row["bytes_sent"]  # replies are the global weights' size: no state
    got = final(stateful_run)
    assert set(got) == set(weights) and "offset" not in got
    for name in weights:
        torch.testing.assert_close(got[name], weights[name], atol=1e-6, rtol=0)
    assert len(states) >= 2 and len({float(s["offset"]) for s in states.values()}) == len(states)
    for client, state in states.items():
        store = ClientStateStore(stateful_run / "clients", client)
        kept = store.load(store.rounds()[-1])
        torch.testing.assert_close(kept["offset"], state["offset"], atol=1e-6, rtol=0)


def test_a_killed_run_resumes_with_the_same_weights_and_client_states(stateful_run: Path, tmp_path: Path) -> None:
    run_federated("toy", STATEFUL, ROUNDS - 1, PER_ROUND, output_dir=tmp_path, min_clients=1, seed=SEED)
    run_federated("toy", STATEFUL, ROUNDS, PER_ROUND, output_dir=tmp_path, min_clients=1, seed=SEED, resume=True)
    # to float tolerance, not bit for bit: the two runs' clients compute in different Ray worker processes, whose
    # BLAS kernels need not round alike (seen once in CI); a resume from a wrong state misses by far more
    full, resumed = final(stateful_run), final(tmp_path)
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=0)
    for client in range(STATEFUL["num_clients"]):
        ours, theirs = ClientStateStore(tmp_path / "clients", client), ClientStateStore(stateful_run / "clients", client)
        assert ours.rounds() == theirs.rounds()
        for server_round in ours.rounds():
            torch.testing.assert_close(ours.load(server_round)["offset"], theirs.load(server_round)["offset"],
                                       atol=1e-6, rtol=0)


def test_a_resume_without_a_clients_state_fails_that_client_with_what_is_missing(stateful_run: Path,
                                                                                tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(stateful_run, out)
    shutil.rmtree(out / "clients")
    run_federated("toy", STATEFUL, ROUNDS + 1, PER_ROUND, output_dir=out, min_clients=1, seed=SEED, resume=True)
    last = rows(out)[-1]
    had_state = [c for c in sample_clients(list(range(STATEFUL["num_clients"])), PER_ROUND, SEED, ROUNDS + 1)
                 if any(c in row["clients"] for row in rows(stateful_run))]
    assert had_state and sorted(f["client"] for f in last["failed"]) == had_state
    assert all("client state of round" in f["reason"] for f in last["failed"])
    assert "state-dir" in (out / "client_errors.log").read_text()  # the full reason names the setting
