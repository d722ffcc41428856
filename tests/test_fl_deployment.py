"""Real deployment on loopback: one SuperLink, two SuperNodes (partition 0 and 1), ``flwr run``.

Two variants of the same federation (tests/deployment.py): plain text (``--insecure``), and TLS with
SuperNode authentication, where only the two registered SuperNodes may join. The job is the toy task with a
client-local output offset, so each SuperNode also keeps its client's own state in its own folder. A third
federation of three SuperNodes runs a round with SecAgg+; a fourth loses a SuperNode mid-round and has its
ServerApp stopped and resumed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from deployment import CONNECTION, REPO, Loopback, loopback, stop
from pki import make_supernode_key, make_tls_files
from safetensors.torch import load_file

from fedp2eft.core.client_state import ClientStateStore
from fedp2eft.fl.toy_task import make_task

TOY = {"num_clients": 2, "dim": 5, "hidden": 6, "local_steps": 2, "seed": 5, "local_offset": True}
ROUNDS = 2
REFUSAL_TIMEOUT_S = 60


def _two_node_federation(directory: Path, secure: bool) -> Iterator[Loopback]:
    tls = make_tls_files(directory) if secure else None
    with loopback(directory, tls) as link:
        for partition in (0, 1):
            link.add_partition_node(partition, num_partitions=2)
        yield link


@pytest.fixture(scope="module")
def insecure_federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loopback]:
    yield from _two_node_federation(tmp_path_factory.mktemp("insecure"), secure=False)


@pytest.fixture(scope="module")
def secure_federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loopback]:
    yield from _two_node_federation(tmp_path_factory.mktemp("secure"), secure=True)


@pytest.fixture(params=["insecure_federation", "secure_federation"], ids=["insecure", "tls-auth"])
def federation(request: pytest.FixtureRequest) -> Loopback:
    return request.getfixturevalue(request.param)


def test_two_supernodes_two_rounds_via_flwr_run(federation: Loopback, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = {"task": "toy", "task_config": TOY, "rounds": ROUNDS, "clients_per_round": 2, "min_clients": 2,
           "seed": 1, "output_dir": str(out), "round_timeout_s": 120, "startup_timeout_s": 120}
    overrides = tmp_path / "job.toml"
    overrides.write_text(f"job = '{json.dumps(job)}'\n")
    result = federation.flwr("run", str(REPO), CONNECTION, "--run-config", str(overrides), "--stream", timeout_s=300)
    assert result.returncode == 0, result.stdout + result.stderr

    state = json.loads((out / "state.json").read_text())
    assert state["round"] == ROUNDS
    assert [(r["successes"], r["failures"], r["clients"]) for r in state["history"]] == [(2, 0, [0, 1])] * ROUNDS
    # Flower 1.42 runs each message in a fresh ClientApp process: the task is built anew every round
    # (docs/federation.md, "One ClientApp process per message"); this fails when that changes
    assert [r["clients_reusing_task"] for r in state["history"]] == [0] * ROUNDS

    task = make_task(TOY)
    weights, states = task.initial_weights(), {0: None, 1: None}
    for server_round in range(1, ROUNDS + 1):
        updates = [task.client_update(weights, c, server_round, states[c]) for c in (0, 1)]
        total = sum(u.num_examples for u in updates)
        weights = {k: sum(u.weights[k] * (u.num_examples / total) for u in updates) for k in weights}
        states = {c: u.state for c, u in enumerate(updates)}
    saved = load_file(str(out / state["checkpoint"]))
    assert set(saved) == set(weights)  # the server holds the shared weights only
    for name, tensor in weights.items():
        torch.testing.assert_close(saved[name], tensor, atol=1e-6, rtol=0)
    assert all(row["bytes_received"] == row["bytes_sent"] for row in state["history"])  # no state in any reply
    assert not (out / "clients").exists()
    for client in (0, 1):  # each node's state stays in that node's folder, and is what the client computed
        store = ClientStateStore(federation.state_dir(client), client)
        assert store.rounds() == [ROUNDS - 1, ROUNDS]
        torch.testing.assert_close(store.load(ROUNDS)["offset"], states[client]["offset"], atol=1e-6, rtol=0)


def test_secured_superlink_refuses_unregistered_and_plaintext_supernodes(secure_federation: Loopback) -> None:
    link = secure_federation
    assert link.wait_for_online_nodes(2, timeout_s=REFUSAL_TIMEOUT_S) == link.registered_nodes
    unregistered_key, _ = make_supernode_key(link.directory, "unregistered")
    # One connection attempt each: both must fail for the reason under test, not by waiting it out.
    once = ("--max-retries", "0", "--max-wait-time", "30")
    unregistered = link.start_supernode("unregistered", "partition-id=0 num-partitions=2", auth_key=unregistered_key,
                                        extra=once)
    plaintext = link.start_supernode("plaintext", "partition-id=1 num-partitions=2", plaintext=True, extra=once)

    assert unregistered.wait(timeout=REFUSAL_TIMEOUT_S) != 0
    assert "Failed to activate SuperNode" in link.log("unregistered")
    assert "No SuperNode found with the given public key" in link.log("superlink")
    assert plaintext.wait(timeout=REFUSAL_TIMEOUT_S) != 0
    # The TLS listener hangs up on a plain HTTP request: "Server disconnected without sending a response" or
    # "Connection reset by peer", depending on timing (a closed port would read "connection refused").
    refused = link.log("plaintext")
    assert "could not establish a connection to the SuperLink" in refused and "refused" not in refused.lower()
    assert link.online_nodes() == link.registered_nodes


def test_secure_aggregation_across_three_supernodes(tmp_path: Path) -> None:
    """SecAgg+ across real SuperNodes (separate processes on loopback, plain text): every round completes with all
    three clients, and the aggregate is FedAvg's within the quantization error the run reports. One round: a SecAgg+
    round is four messages per node, each in a fresh ClientApp process here (about 75 s a round on 2 cores)."""
    toy = {key: value for key, value in TOY.items() if key != "local_offset"} | {"num_clients": 3}
    with loopback(tmp_path) as link:
        for partition in range(3):
            link.add_partition_node(partition, num_partitions=3)
        out = tmp_path / "out"
        job = {"task": "toy", "task_config": toy, "rounds": 1, "clients_per_round": 3, "min_clients": 3,
               "seed": 1, "output_dir": str(out), "round_timeout_s": 120, "startup_timeout_s": 120, "secagg": {}}
        overrides = tmp_path / "job.toml"
        overrides.write_text(f"job = '{json.dumps(job)}'\n")
        result = link.flwr("run", str(REPO), CONNECTION, "--run-config", str(overrides), "--stream", timeout_s=300)
    assert result.returncode == 0, result.stdout + result.stderr
    state = json.loads((out / "state.json").read_text())
    assert [(r["successes"], r["clients"], r["secagg/shares"]) for r in state["history"]] == [(3, [0, 1, 2], 3)]
    task = make_task(toy)
    weights = task.initial_weights()
    updates = [task.client_update(weights, c, 1) for c in range(3)]
    total = sum(u.num_examples for u in updates)
    weights = {k: sum(u.weights[k] * (u.num_examples / total) for u in updates) for k in weights}
    bound = state["history"][0]["secagg/error_bound"]
    saved = load_file(str(out / state["checkpoint"]))
    errors = [float((saved[name] - tensor).abs().max()) for name, tensor in weights.items()]
    assert 0 < max(errors) <= bound + 1e-6  # quantized (so SecAgg+ really ran), within its bound


def _wait_for_round(out: Path, round_: int, timeout_s: float) -> dict:
    """The run's state.json once it records ``round_`` finished rounds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = json.loads((out / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = {"round": 0}
        if state["round"] >= round_:
            return state
        time.sleep(0.2)
    raise TimeoutError(f"round {round_} not finished after {timeout_s}s")


def test_a_killed_supernode_and_a_stopped_serverapp_in_deployment(tmp_path: Path) -> None:
    """Three SuperNodes; one is killed while round 2 trains: the round completes with the other two (min_clients=2).
    Then the ServerApp is stopped with ``flwr stop`` mid-run, the SuperNode comes back, and the same job with
    ``resume`` continues from the last checkpoint to the final round. The final weights are FedAvg over exactly
    the clients each round's history names, recomputed here: the restart changed nothing."""
    toy = {key: value for key, value in TOY.items() if key != "local_offset"} | {"num_clients": 3, "busy_ms": 1000.0}
    rounds = 3
    out = tmp_path / "out"
    job = {"task": "toy", "task_config": toy, "rounds": rounds, "clients_per_round": 3, "min_clients": 2, "seed": 1,
           "output_dir": str(out), "round_timeout_s": 40, "startup_timeout_s": 60}
    overrides = tmp_path / "job.toml"
    with loopback(tmp_path) as link:
        for partition in range(3):
            link.add_partition_node(partition, num_partitions=3)
        overrides.write_text(f"job = '{json.dumps(job)}'\n")
        started = link.flwr("run", str(REPO), CONNECTION, "--run-config", str(overrides), "--format", "json")
        assert started.returncode == 0, started.stdout + started.stderr
        run_id = int(json.loads(started.stdout)["run-id"])
        _wait_for_round(out, 1, timeout_s=180)
        stop(next(p for p in link.processes if "partition-id=2" in " ".join(map(str, p.args))))  # mid-round 2
        state = _wait_for_round(out, 2, timeout_s=120)
        assert state["history"][1]["clients"] == [0, 1] and state["history"][1]["failures"] == 1
        assert link.flwr("stop", str(run_id), CONNECTION).returncode == 0
        time.sleep(2)
        stopped_at = json.loads((out / "state.json").read_text())["round"]
        assert stopped_at < rounds  # stopped mid-run
        link.add_partition_node(2, num_partitions=3)  # the node comes back
        overrides.write_text(f"job = '{json.dumps(job | {'resume': True})}'\n")
        resumed = link.flwr("run", str(REPO), CONNECTION, "--run-config", str(overrides), "--stream", timeout_s=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    state = json.loads((out / "state.json").read_text())
    assert state["round"] == rounds and [row["round"] for row in state["history"]] == list(range(1, rounds + 1))
    # the node that came back trains again (on a loaded machine another one may miss a round's timeout: the
    # FedAvg check below recomputes from exactly the clients each round names)
    assert state["history"][0]["clients"] == [0, 1, 2] and 2 in state["history"][-1]["clients"]

    task = make_task(toy)
    weights = task.initial_weights()
    for row in state["history"]:
        updates = [task.client_update(weights, c, row["round"]) for c in row["clients"]]
        total = sum(u.num_examples for u in updates)
        weights = {k: sum(u.weights[k] * (u.num_examples / total) for u in updates) for k in weights}
    saved = load_file(str(out / state["checkpoint"]))
    for name, tensor in weights.items():  # Flower's float32 average against this one: a few ulps of values ~1
        torch.testing.assert_close(saved[name], tensor, atol=1e-6, rtol=0)
