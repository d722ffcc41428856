"""End-to-end simulation of the toy task: aggregate, checkpoints, metrics, resume equivalence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CLIENTS_PER_ROUND, FULL_ROUNDS, TOY_CONFIG, npy_bytes
from fedp2eft.core.generator import PSGenerator
from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl.checkpoint import is_new_best, load_best
from fedp2eft.fl.job import Job
from fedp2eft.fl.server_app import sample_clients, serve
from fedp2eft.fl.simulation import run_federated
from fedp2eft.fl.toy_task import make_task
from fedp2eft.fl.weights import update_norm


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    state = json.loads((out / "state.json").read_text())
    return load_file(str(out / state["checkpoint"]))


def test_simulation_matches_independent_fedavg(full_toy_run: Path) -> None:
    rows = read_rows(full_toy_run)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["successes"] == CLIENTS_PER_ROUND and r["failures"] == 0 for r in rows)
    assert all(r["bytes_sent"] > 0 and r["bytes_received"] == r["bytes_sent"] for r in rows)
    assert all(r["round_time_s"] > 0 and "train/loss" in r for r in rows)
    assert rows[-1]["clients_reusing_task"] == CLIENTS_PER_ROUND  # Ray actors keep their task across rounds

    task = make_task(TOY_CONFIG)
    weights = task.initial_weights()
    starts = []
    for row in rows:
        starts.append(weights)
        clients = sample_clients(list(range(task.num_clients())), CLIENTS_PER_ROUND, 11, row["round"])
        assert row["clients"] == clients
        updates = [task.client_update(weights, c, row["round"]) for c in clients]
        total = sum(u.num_examples for u in updates)
        assert row["num_examples"] == total
        # the norms a DP clipping norm is chosen from; the actors' float32 updates may differ from these by a few
        # ulps of weights of size ~1, against update norms of ~1e-2 or more: 1e-3 relative is ample
        norms = sorted(update_norm(weights, u.weights) for u in updates)
        assert row["update_norm_max"] == pytest.approx(norms[-1], rel=1e-3)
        assert row["update_norm_median"] == pytest.approx(float(np.median(norms)), rel=1e-3)
        weights = {k: sum(u.weights[k].double() * u.num_examples for u in updates) / total for k in weights}
        weights = {k: v.float() for k, v in weights.items()}
    got = final_weights(full_toy_run)
    assert set(got) == set(weights)
    for name in weights:
        torch.testing.assert_close(got[name], weights[name], atol=1e-6, rtol=0)

    # early stopping: the global weights on which clients measured the lowest loss_before are kept
    best_round = min(range(len(rows)), key=lambda i: rows[i]["train/loss_before"])
    kept, after_round = load_best(full_toy_run)
    assert after_round == best_round
    for name in weights:
        torch.testing.assert_close(kept[name], starts[best_round][name], atol=1e-6, rtol=0)

    state = json.loads((full_toy_run / "state.json").read_text())
    assert state["round"] == FULL_ROUNDS and len(state["history"]) == FULL_ROUNDS
    assert list(full_toy_run.glob("global-round*.safetensors")) == [full_toy_run / state["checkpoint"]]
    assert list((full_toy_run / "tensorboard").glob("events.out.tfevents.*"))


def test_traffic_per_client_adds_up_and_is_the_size_of_the_weights(full_toy_run: Path) -> None:
    rows = read_rows(full_toy_run)
    size = npy_bytes(make_task(TOY_CONFIG).initial_weights())
    sent_so_far = received_so_far = 0
    for row in rows:
        by_client = row["bytes_by_client"]
        assert sorted(int(c) for c in by_client) == row["clients"]  # every sampled client, here all succeeded
        assert all(traffic == {"sent": size, "received": size} for traffic in by_client.values())
        assert row["bytes_sent"] == sum(t["sent"] for t in by_client.values()) == size * CLIENTS_PER_ROUND
        assert row["bytes_received"] == sum(t["received"] for t in by_client.values())
        sent_so_far += row["bytes_sent"]
        received_so_far += row["bytes_received"]
        assert (row["bytes_sent_cumulative"], row["bytes_received_cumulative"]) == (sent_so_far, received_so_far)

    events = EventAccumulator(str(full_toy_run / "tensorboard"))
    events.Reload()
    for tag in ("bytes_sent_cumulative", "bytes_received_cumulative"):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(r["round"], r[tag]) for r in rows]


def test_resume_ends_with_the_same_weights(full_toy_run: Path, tmp_path: Path) -> None:
    common = dict(output_dir=tmp_path, min_clients=2, seed=11)
    run_federated("toy", TOY_CONFIG, 2, CLIENTS_PER_ROUND, **common)
    assert json.loads((tmp_path / "state.json").read_text())["round"] == 2
    path = run_federated("toy", TOY_CONFIG, FULL_ROUNDS, CLIENTS_PER_ROUND, resume=True, **common)
    assert path.name == "global-round00003.safetensors"
    resumed, full = load_file(str(path)), final_weights(full_toy_run)
    for name in full:
        assert torch.equal(resumed[name], full[name]), name
    assert [r["clients"] for r in read_rows(tmp_path)] == [r["clients"] for r in read_rows(full_toy_run)]


def test_existing_run_needs_resume_and_same_settings(full_toy_run: Path) -> None:
    base = dict(task="toy", task_config=TOY_CONFIG, rounds=4, clients_per_round=CLIENTS_PER_ROUND, min_clients=2,
                output_dir=str(full_toy_run))
    with pytest.raises(FedP2EFTError, match="pass resume"):
        serve(None, Job(seed=11, **base))  # type: ignore[arg-type]  # fails before the grid is touched
    with pytest.raises(FedP2EFTError, match=r"\['seed'\] differ"):
        serve(None, Job(seed=12, resume=True, **base))  # type: ignore[arg-type]


def test_ps_generator_task_trains_inside_flower(tmp_path: Path) -> None:
    """The method core's real GeneratorTask (tiny BERT) runs in Ray actors and reports mean lambda."""
    path = run_federated("fl_tasks:make_tiny_psg_task", {"num_clients": 3}, 2, 2, output_dir=tmp_path,
                         min_clients=2, seed=0)
    rows = read_rows(tmp_path)
    assert [(r["round"], r["successes"]) for r in rows] == [(1, 2), (2, 2)]
    assert all(r["train/mean_lambda"] > 1e-3 for r in rows)  # stage 1 lifted lambda from the 1e-4 start
    assert rows[0]["train/l1_after"] < rows[0]["train/l1_before"]  # stage 2 regressed the PSG towards it
    from fl_tasks import make_tiny_psg_task

    start = make_tiny_psg_task({"num_clients": 3}).initial_weights()
    trained = load_file(str(path))
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in start.items()}
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_standardized_generator_starts_from_every_clients_feature_statistics(tmp_path: Path) -> None:
    """With standardize_features the server asks every client once for its feature sums before round 1; the
    generator's shift and scale are the mean and std over all clients (not only the sampled ones), they travel
    with the weights unchanged, and the exported generator applies them."""
    from fl_tasks import make_tiny_psg_task

    config = {"num_clients": 3, "standardize_features": True}
    path = run_federated("fl_tasks:make_tiny_psg_task", config, 2, 2, output_dir=tmp_path, min_clients=2, seed=0)
    task = make_tiny_psg_task(config)
    features = torch.stack([task.features(i) for i in range(3)]).double()
    statistics = [task.client_statistics(i) for i in range(3)]
    start = task.initial_weights_from({k: sum(s[k] for s in statistics) for k in statistics[0]})
    trained = load_file(str(path))
    for weights in (start, trained):
        assert torch.allclose(weights["feature_shift"].double(), features.mean(0), atol=1e-6)
        floor = 1e-6 + 1e-3 * features.mean(0).abs()  # near-constant features are not blown up
        expected = torch.maximum(features.std(0, unbiased=False), floor)
        assert torch.allclose(weights["feature_scale"].double(), expected, rtol=1e-4)
        assert (weights["feature_scale"].double() > floor * 1.5).any()  # most features keep their own spread
    assert torch.equal(trained["feature_shift"], start["feature_shift"])
    assert not torch.equal(trained["net.0.weight"], start["net.0.weight"])  # it trained on top of them
    exported = task.export(trained, tmp_path / "export")
    generator = PSGenerator.load(exported)
    assert generator.standardized
    raw = PSGenerator(generator.spec)
    raw.load_state_dict({k: v for k, v in trained.items() if not k.startswith("feature_")})
    x = features[0].float()
    assert torch.allclose(generator(x), raw((x - trained["feature_shift"]) / trained["feature_scale"]))


# The built-in "psg" task on the embedded multilingual-e5-small and two tiny intents clients.
PSG_CONFIG = {
    "model": "multilingual-e5-small", "dataset": "intents", "max_length": 32,
    "dataset_options": {"clients_per_language": 1, "train_size": 16, "test_size": 4, "languages": "en,de"},
    "training": {"local_epochs": 1, "regression_steps": 3, "personalize": {"max_rank": 4, "batch_size": 8}},
}


def test_builtin_psg_task_runs_one_round_in_simulation(tmp_path: Path) -> None:
    from fedp2eft.experiment import Setup

    # the generator trains on a base model with a head for the dataset's labels, as the base stage leaves it
    setup = Setup.from_config(PSG_CONFIG)
    setup.load_base_model(new_head_seed=0).save_pretrained(tmp_path / "base")
    setup.tokenizer.save_pretrained(tmp_path / "base")
    out = tmp_path / "psg"
    path = run_federated("psg", {**PSG_CONFIG, "model": str(tmp_path / "base")}, 1, 2, output_dir=out, min_clients=2)
    tmp_path = out
    (row,) = read_rows(tmp_path)
    assert row["successes"] == 2 and row["failures"] == 0 and row["num_examples"] == 32
    assert row["train/mean_lambda"] >= 1e-4 and "train/stage1_loss" in row
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["job"]["task"] == "psg" and path == tmp_path / state["checkpoint"]
    weights = load_file(str(path))
    assert weights and all(bool(torch.isfinite(v).all()) for v in weights.values())


def test_a_new_best_needs_a_lower_value_than_every_earlier_round():
    rows = [{"train/m": 3.0}, {"train/m": 2.0}, {"other": 1.0}, {"train/m": 2.0}, {"train/m": 1.5}]
    assert [is_new_best(rows[: i + 1], "m") for i in range(len(rows))] == [True, True, False, False, True]
