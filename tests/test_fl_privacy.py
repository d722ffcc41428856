"""User-level DP-FedAvg in Flower: every client's update is clipped to the norm, the clipped updates are averaged
with equal weights and noised, and the privacy spent is reported per round (docs/federation.md, "Differential
privacy")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TOY_CONFIG
from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl.job import Job
from fedp2eft.fl.privacy import DPConfig, epsilon_spent
from fedp2eft.fl.server_app import sample_clients
from fedp2eft.fl.simulation import run_federated
from fedp2eft.fl.toy_task import make_task

ROUNDS, PER_ROUND, SEED = 3, 2, 3
# a clipping norm far below the toy updates' norms, so every update is clipped; noise small enough to compare
DP = {"noise_multiplier": 1e-6, "clipping_norm": 0.01, "delta": 1e-5}


@pytest.fixture(scope="module")
def private_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dp")
    run_federated("toy", TOY_CONFIG, ROUNDS, PER_ROUND, output_dir=out, min_clients=1, seed=SEED, dp=DP)
    return out


def test_updates_are_clipped_averaged_equally_and_noised(private_run: Path) -> None:
    task = make_task(TOY_CONFIG)
    weights = task.initial_weights()
    rows = [json.loads(line) for line in (private_run / "metrics.jsonl").read_text().splitlines()]
    for server_round, row in zip(range(1, ROUNDS + 1), rows):
        clients = row["clients"]  # drawn in secret: the run's record is the only way to know them
        clipped = []
        for client in clients:
            update = task.client_update(weights, client, server_round)
            delta = {k: update.weights[k].double() - weights[k].double() for k in weights}
            norm = torch.sqrt(sum((d ** 2).sum() for d in delta.values()))
            assert norm > DP["clipping_norm"]  # the test would not see clipping otherwise
            clipped.append({k: d * DP["clipping_norm"] / norm for k, d in delta.items()})
        weights = {k: (weights[k].double() + sum(c[k] for c in clipped) / len(clipped)).float() for k in weights}
    state = json.loads((private_run / "state.json").read_text())
    saved = load_file(str(private_run / state["checkpoint"]))
    for name in weights:
        torch.testing.assert_close(saved[name], weights[name], atol=1e-5, rtol=0)


def test_dp_runs_with_the_same_seed_sample_different_clients(private_run: Path, tmp_path: Path) -> None:
    """Privacy amplification by sampling needs a sample nobody can recompute: with DP the server draws each
    round's clients from the operating system, not from the run's public seed. Same seed, 20 clients, 2 per round,
    3 rounds: the two runs' samples coincide by chance with probability (1/190)^3; seeded sampling (no DP) always does."""
    def samples(out: Path) -> list[list[int]]:
        return [json.loads(line)["clients"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    config = {**TOY_CONFIG, "num_clients": 20}
    runs = {}
    for name in ("a", "b"):
        run_federated("toy", config, ROUNDS, PER_ROUND, output_dir=tmp_path / name, seed=SEED, dp=DP)
        runs[name] = samples(tmp_path / name)
    assert runs["a"] != runs["b"]
    assert all(len(set(clients)) == PER_ROUND for clients in runs["a"] + runs["b"])
    plain = [sample_clients(list(range(20)), PER_ROUND, SEED, server_round) for server_round in (1, 2, 3)]
    assert plain == [sample_clients(list(range(20)), PER_ROUND, SEED, server_round) for server_round in (1, 2, 3)]
    rows = [json.loads(line) for line in (private_run / "metrics.jsonl").read_text().splitlines()]
    assert all(row["privacy/secret_sampling"] == 1.0 for row in rows)


def test_privacy_spent_is_reported_per_round(private_run: Path) -> None:
    rows = [json.loads(line) for line in (private_run / "metrics.jsonl").read_text().splitlines()]
    dp = DPConfig(**DP)
    population = TOY_CONFIG["num_clients"]
    assert [row["privacy/epsilon"] for row in rows] == [epsilon_spent(dp, r, population, PER_ROUND)
                                                        for r in range(1, ROUNDS + 1)]
    assert rows[0]["privacy/epsilon"] < rows[-1]["privacy/epsilon"]
    assert all(row["privacy/sampling_rate"] == PER_ROUND / population and row["privacy/delta"] == 1e-5
               for row in rows)
    assert not any("update_norm_max" in row for row in rows)  # a DP run publishes nothing about single updates
    assert list((private_run / "tensorboard").glob("events.out.tfevents.*"))


def test_epsilon_falls_with_more_noise_and_with_subsampling() -> None:
    loud, quiet = DPConfig(2.0, 1.0), DPConfig(0.8, 1.0)
    assert epsilon_spent(loud, 20, 100, 10) < epsilon_spent(quiet, 20, 100, 10)
    assert epsilon_spent(loud, 20, 100, 10) < epsilon_spent(loud, 20, 100, 100)  # amplification by sampling
    assert epsilon_spent(loud, 10, 100, 10) < epsilon_spent(loud, 20, 100, 10) and epsilon_spent(loud, 0, 5, 1) == 0


@pytest.mark.parametrize("dp, message", [
    ({"noise_multiplier": 0, "clipping_norm": 1.0}, "noise_multiplier must be a positive number"),
    ({"noise_multiplier": 1.0, "clipping_norm": 1.0, "delta": 2}, "delta must be between 0 and 1"),
    ({"noise_multiplier": 1.0}, "needs noise_multiplier and clipping_norm"),
    ({"noise_multiplier": 1.0, "clipping_norm": 1.0, "sigma": 1}, "unknown key"),
])
def test_bad_privacy_settings_are_named(dp: dict, message: str) -> None:
    with pytest.raises(FedP2EFTError, match=message):
        Job(task="toy", output_dir="/tmp/x", rounds=1, clients_per_round=1, dp=dp)


def test_the_report_lists_each_private_stage_with_its_final_epsilon(private_run: Path, tmp_path: Path) -> None:
    from fedp2eft.benchmark.report.privacy import privacy_markdown, privacy_spent

    (tmp_path / "seed0" / "psg").mkdir(parents=True)
    (tmp_path / "seed0" / "psg" / "metrics.jsonl").write_text((private_run / "metrics.jsonl").read_text())
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "metrics.jsonl").write_text('{"round": 1, "train/loss": 0.5}\n')  # trained without DP
    entries = privacy_spent(tmp_path)
    last = json.loads((private_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert [(e["stage"], e["rounds"], e["epsilon"]) for e in entries] == [("seed0/psg", ROUNDS,
                                                                          last["privacy/epsilon"])]
    assert f"| seed0/psg | {ROUNDS} | {last['privacy/epsilon']:.3g} |" in privacy_markdown(entries)
