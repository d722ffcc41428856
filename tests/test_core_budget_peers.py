"""HetLoRA and FlexLoRA (core/methods/hetlora/, core/methods/flexlora/, core/prefix_lora.py): each seen client's own budget,
its share of the global factors, HetLoRA's self-pruning and sparsity-weighted aggregation and FlexLoRA's SVD
redistribution against small hand computations, the refusal of DP and SecAgg+, and one round of each
budget-heterogeneous peer on Flower in simulation equal to the stage's own server rule applied to its clients'
updates."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fedp2eft.core.federation import Reply, aggregates_itself
from fedp2eft.core.methods.flexlora.task import FlexLoRATask, svd_factors, svd_redistribution
from fedp2eft.core.methods.hetlora.task import HetLoRAConfig, HetLoRATask, self_prune, sparsity_weighted, tail_size
from fedp2eft.core.methods import PersonalizeConfig, personalize
from fedp2eft.core.prefix_lora import PeerConfig, client_budgets, from_weights
from fedp2eft.data.types import ClientData
from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl.aggregation import make_strategy
from fedp2eft.fl.privacy import DPConfig

CONFIG = PersonalizeConfig(max_rank=4, epochs=1, batch_size=8, lora_lr=1e-2)


def test_each_seen_client_trains_at_its_own_budget_in_equal_shares():
    budgets = client_budgets(8, [4, 2], seed=0)
    assert sorted(budgets) == [2, 2, 2, 2, 4, 4, 4, 4]
    assert budgets == client_budgets(8, [2, 4], seed=0)  # the order the budgets are listed in does not matter
    assert len({tuple(client_budgets(8, [2, 4], seed=s)) for s in range(5)}) > 1  # dealt by the seed
    with pytest.raises(FedP2EFTError, match="needs the run's rank budgets"):
        client_budgets(8, [], seed=0)


@pytest.mark.parametrize("model_kind", ["bert"])
def test_a_client_receives_and_returns_the_first_components_of_its_budget(setup):
    base, task, train, _ = setup
    clients = [ClientData(f"c{i}", "xx", train[8 * i: 8 * i + 8], []) for i in range(4)]
    job = FlexLoRATask(base, task, clients, PeerConfig(personalize=CONFIG, local_epochs=1), "tiny", [1, 4])
    weights = job.initial_weights()
    for client, budget in enumerate(job.budgets):
        share = from_weights(job.client_weights(weights, client))
        for name, (a, b) in from_weights(weights).items():
            assert torch.equal(share[name][0], a[:budget]) and torch.equal(share[name][1], b[:, :budget])
        update = job.client_update(job.client_weights(weights, client), client, 1)
        assert {k: v.shape for k, v in update.weights.items()} == {k: v.shape for k, v in
                                                                   job.client_weights(weights, client).items()}
        assert update.metrics["budget"] == budget
    with pytest.raises(FedP2EFTError, match="exceed personalize.max_rank=4"):
        FlexLoRATask(base, task, clients, PeerConfig(personalize=CONFIG), "tiny", [2, 8])


def test_hetlora_tail_and_self_pruning():
    assert [tail_size(r, 0.25) for r in (1, 2, 4, 8, 16)] == [0, 1, 1, 2, 4]
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    small_tail = {"m": (a, torch.tensor([[2.0, 0.01], [0.0, 0.0]]))}  # tail's share of ||B A||: 0.01 / 2.00002
    large_tail = {"m": (a, torch.tensor([[2.0, 0.5], [0.0, 0.0]]))}  # 0.5 / 2.06
    pruned, count = self_prune(small_tail, fraction=0.25, threshold=0.05)
    assert count == 1 and torch.equal(pruned["m"][1], torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(pruned["m"][0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(small_tail["m"][1][0, 1], torch.tensor(0.01))  # the input is left as it was
    kept, count = self_prune(large_tail, fraction=0.25, threshold=0.05)
    assert count == 0 and torch.equal(kept["m"][1], large_tail["m"][1])
    rank_one = {"m": (a[:1], torch.tensor([[0.001], [0.0]]))}
    assert self_prune(rank_one, 0.25, 0.05)[1] == 0  # nothing trails a single component


def test_hetlora_aggregation_by_hand():
    global_a = torch.full((3, 2), 7.0)  # rank R = 3, in 2
    global_b = torch.full((2, 3), 5.0)  # out 2
    one = {"m": (torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]]))}  # B A = [[2, 0], [0, 0]]: norm 2
    two = {"m": (torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))}  # [[0, 1], [1, 1]]
    a, b = sparsity_weighted({"m": (global_a, global_b)}, [one, two])["m"]
    w1, w2 = 2 / (2 + math.sqrt(3)), math.sqrt(3) / (2 + math.sqrt(3))  # norms 2 and sqrt(3), normalized
    expected_a = torch.tensor([[w1 * 1 + w2 * 0, w1 * 0 + w2 * 1],  # component 1: both clients
                               [w1 * 0 + w2 * 1, w1 * 0 + w2 * 1],  # component 2: client one zero-padded
                               [7.0, 7.0]])  # component 3: nobody trained it, the global value stays
    expected_b = torch.tensor([[w1 * 2 + w2 * 1, w2 * 0, 5.0], [w1 * 0 + w2 * 0, w2 * 1, 5.0]])
    torch.testing.assert_close(a, expected_a, atol=1e-6, rtol=0)  # a few float32 roundings of values <= 7
    torch.testing.assert_close(b, expected_b, atol=1e-6, rtol=0)


def test_flexlora_redistribution_by_hand():
    one = {"m": (torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0], [0.0]]))}  # B A = [[3, 0], [0, 0]], 1 example
    two = {"m": (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [2.0]]))}  # B A = [[0, 0], [0, 2]], 3 examples
    start = {"m": (torch.zeros(2, 2), torch.zeros(2, 2))}
    a, b = svd_redistribution(start, [(one, 1), (two, 3)])["m"]
    # dW = 1/4 [[3, 0], [0, 0]] + 3/4 [[0, 0], [0, 2]] = diag(0.75, 1.5): singular values 1.5 then 0.75
    torch.testing.assert_close(b @ a, torch.diag(torch.tensor([0.75, 1.5])), atol=1e-6, rtol=0)
    torch.testing.assert_close(b[:, :1] @ a[:1], torch.diag(torch.tensor([0.0, 1.5])), atol=1e-6, rtol=0)
    torch.testing.assert_close(a.norm(dim=1), torch.tensor([1.5, 0.75]).sqrt(), atol=1e-6, rtol=0)  # sqrt(S) each
    torch.testing.assert_close(b.norm(dim=0), torch.tensor([1.5, 0.75]).sqrt(), atol=1e-6, rtol=0)


def test_flexlora_keeps_a_trainable_direction_where_the_update_has_no_rank():
    previous = torch.arange(12.0).view(4, 3)  # the global A before the round (rank R = 4, in 3)
    a, b = svd_factors([(1.0, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[2.0], [0.0]]))], previous)
    assert a.shape == (4, 3) and b.shape == (2, 4)
    torch.testing.assert_close(b @ a, torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), atol=1e-6, rtol=0)
    assert torch.equal(b[:, 1:], torch.zeros(2, 3))  # one rank was trained: no product beyond it
    assert torch.equal(a[1:], previous[1:])  # but those components keep an A, so a client can still train them


def test_flexlora_svd_from_factors_equals_the_full_svd():
    torch.manual_seed(0)
    terms = [(w, torch.randn(r, 7), torch.randn(5, r)) for w, r in ((0.25, 1), (0.75, 3))]
    a, b = svd_factors(terms, torch.zeros(4, 7))
    update = sum(w * bi.double() @ ai.double() for w, ai, bi in terms)
    full = torch.linalg.svd(update).S
    # the rank-4 summary of a rank-4 update is the update; its rank-2 cut keeps the two largest singular values
    torch.testing.assert_close((b @ a).double(), update, atol=1e-5, rtol=0)  # float32 factors of values ~1-10
    torch.testing.assert_close(torch.linalg.svd((b[:, :2] @ a[:2]).double()).S[:2], full[:2], atol=1e-5, rtol=0)


def test_a_task_that_aggregates_itself_refuses_differential_privacy():
    class Own:
        def aggregate(self, weights, replies, server_round):
            return weights

        def client_weights(self, weights, client_index):
            return weights

    assert aggregates_itself(Own())
    with pytest.raises(FedP2EFTError, match="differential privacy cannot be added"):
        make_strategy("fedavg", DPConfig(noise_multiplier=1.0, clipping_norm=1.0), 2, task=Own())


@pytest.mark.parametrize("stage", ["nested", "hetlora", "flexlora"])
def test_one_round_on_flower_is_the_stages_server_rule(stage, tmp_path):
    """The simulation's checkpoint after one round equals the stage's own rule (FedAvg for nested-rank LoRA,
    HetLoRA's and FlexLoRA's aggregation) applied to the same clients' updates computed here."""
    from fedp2eft.experiment import Setup, make_stage_task
    from fedp2eft.fl.server_app import sample_clients
    from fedp2eft.fl.simulation import run_federated

    config = {"model": "multilingual-e5-small", "dataset": "intents", "max_length": 32, "budgets": [1, 4],
              "dataset_options": {"clients_per_language": 1, "train_size": 16, "test_size": 4, "languages": "en,de"},
              "training": {"local_epochs": 1, "personalize": {"max_rank": 4, "batch_size": 8}}}
    setup = Setup.from_config(config)
    setup.load_base_model(new_head_seed=0).save_pretrained(tmp_path / "base")
    setup.tokenizer.save_pretrained(tmp_path / "base")
    config["model"] = str(tmp_path / "base")
    out = tmp_path / stage
    run_federated(stage, config, 1, 2, output_dir=out, min_clients=2, seed=5)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["successes"] == 2
    state = json.loads((out / "state.json").read_text())
    got = load_file(str(out / state["checkpoint"]))

    task = make_stage_task(stage, config)
    start = task.initial_weights()
    own_rule = aggregates_itself(task)
    clients = sample_clients(list(range(task.num_clients())), 2, 5, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the simulation's actors train: the same sums in the same order
    try:
        updates = {c: task.client_update(task.client_weights(start, c) if own_rule else start, c, 1) for c in clients}
    finally:
        torch.set_num_threads(threads)
    if own_rule:
        budgets = [task.budgets[c] for c in clients]
        sent = [row["bytes_by_client"][str(c)]["sent"] for c in clients]
        assert (budgets[0] < budgets[1]) == (sent[0] < sent[1])  # a client is sent only its own budget's share
        expected = task.aggregate(start, [Reply(c, u.weights, u.num_examples) for c, u in updates.items()], 1)
        for key in start:  # the same float32 computation on the same updates
            torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)
        assert not any(torch.equal(got[k], start[k]) for k in start if k.endswith(".B"))
        return
    total = sum(u.num_examples for u in updates.values())
    for key in start:
        expected = sum(u.weights[key].double() * u.num_examples for u in updates.values()) / total
        # Flower averages in float32: each weighted term and the sum rounded once, a few ulps of the largest value
        tolerance = 4 * torch.finfo(torch.float32).eps * float(expected.abs().max())
        torch.testing.assert_close(got[key].double(), expected, atol=tolerance, rtol=0)
        assert not torch.equal(got[key], start[key]) or key.endswith(".A")  # every B moved


@pytest.mark.parametrize("model_kind", ["bert"])
@pytest.mark.parametrize("stage_task", [HetLoRATask, FlexLoRATask])
def test_personalization_starts_from_the_peers_cut(setup, stage_task, tmp_path):
    base, task, train, _ = setup
    clients = [ClientData(f"c{i}", "xx", train[8 * i: 8 * i + 8], []) for i in range(2)]
    config = (HetLoRAConfig if stage_task is HetLoRATask else PeerConfig)(personalize=CONFIG, local_epochs=1)
    job = stage_task(base, task, clients, config, "tiny", [2, 4])
    weights = job.initial_weights()
    trained = job.aggregate(weights, [Reply(c, job.client_update(job.client_weights(weights, c), c, 1).weights, 8)
                                      for c in range(2)], 1)
    factors = job.artifact.load(job.export(trained, tmp_path), base, CONFIG)
    method = "hetlora" if stage_task is HetLoRATask else "flexlora"
    frozen = PersonalizeConfig(max_rank=4, epochs=1, batch_size=8, lora_lr=0.0)
    result = personalize(method, base, task, train, budget=2, config=frozen, artifact=factors)
    modules = dict(result.model.base_model.model.named_modules())
    for name, (a, b) in factors.items():
        assert torch.equal(modules[name].lora_A["default"].weight, a[:2])
        assert torch.equal(modules[name].lora_B["default"].weight, b[:, :2])
