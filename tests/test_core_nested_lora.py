"""Nested-rank LoRA (core/methods/nested_lora/): the cut at a budget, the per-step ranks, a
client's step training only its leading components and personalization starting from the cut on both paths (its
round on Flower: tests/test_core_budget_peers.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedp2eft.core.methods import ClientContext, PersonalizeConfig, personalize, personalize_many
from fedp2eft.core.methods.nested_lora.task import ARTIFACT, NestedLoRATask, step_ranks
from fedp2eft.core.prefix_lora import PeerConfig, from_weights, leading
from fedp2eft.data.types import ClientData
from fedp2eft.errors import FedP2EFTError

CONFIG = PersonalizeConfig(max_rank=4, epochs=1, batch_size=8, lora_lr=1e-2)


def test_the_cut_at_a_budget_computes_the_leading_components_update():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])  # rank 3 x in 2
    b = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, -1.0]])  # out 2 x rank 3
    ((cut_a, cut_b),) = leading({"m": (a, b)}, 2).values()
    # by hand: B[:, :2] @ A[:2] = [[1*1 + 1*0, 1*0 + 1*2], [0*1 + 1*0, 0*0 + 1*2]]
    assert torch.equal(cut_b @ cut_a, torch.tensor([[1.0, 2.0], [0.0, 2.0]]))


def test_step_ranks_are_reproducible_and_cover_one_to_r():
    ranks = step_ranks(seed=3, server_round=2, client_index=1, steps=400, max_rank=4)
    assert ranks == step_ranks(3, 2, 1, 400, 4) != step_ranks(3, 2, 2, 400, 4)
    assert set(ranks) == {1, 2, 3, 4}


def nested_task(setup, epochs: int = 1) -> NestedLoRATask:
    base, task, train, _ = setup
    clients = [ClientData(f"c{i}", "xx", train[8 * i: 8 * i + 8], []) for i in range(2)]  # one step per epoch each
    config = PeerConfig(personalize=CONFIG, local_epochs=epochs)
    return NestedLoRATask(base, task, clients, config, "tiny")


def test_a_local_step_trains_only_the_components_of_its_rank(setup):
    task = nested_task(setup)
    weights = task.initial_weights()  # B = 0, so only B gets a gradient in the first step
    update = task.client_update(weights, client_index=0, server_round=1)
    (rank,) = step_ranks(0, 1, 0, 1, CONFIG.max_rank)
    for name, (a, b) in from_weights(update.weights).items():
        before_a, before_b = from_weights(weights)[name]
        assert torch.equal(a, before_a), name
        assert torch.equal(b[:, rank:], before_b[:, rank:]), (name, rank)  # switched off: no gradient, no step
        assert not torch.equal(b[:, :rank], before_b[:, :rank]), (name, rank)
    assert update.metrics["mean_step_rank"] == rank and update.num_examples == 8


@pytest.mark.parametrize("model_kind", ["bert"])
def test_personalization_starts_from_the_cut_on_both_paths(setup, tmp_path):
    """With a learning rate of 0 a personalized run keeps its start: exactly the adapter's first r components."""
    base, task_, train, _ = setup
    job = nested_task(setup)
    trained = job.client_update(job.initial_weights(), 0, 1).weights
    path = job.export(trained, tmp_path)
    factors = ARTIFACT.load(path, base, CONFIG)
    frozen = replace(CONFIG, lora_lr=0.0)
    alone = personalize("nested-lora", base, task_, train, budget=2, config=frozen, artifact=factors)
    modules = dict(alone.model.base_model.model.named_modules())
    [batched] = personalize_many(ClientContext(base, task_, train, {"nested": factors}), [("nested-lora", 2, frozen)])
    layers = batched.model.layers
    for name, (a, b) in leading(factors, 2).items():
        assert torch.equal(modules[name].lora_A["default"].weight, a) and torch.equal(
            modules[name].lora_B["default"].weight, b), name
        assert torch.equal(layers[name].a[batched.run], a) and torch.equal(layers[name].b[batched.run], b), name
    assert alone.ranks == batched.ranks == dict.fromkeys(factors, 2)
    with pytest.raises(FedP2EFTError, match="does not fit the rank-4 LoRA of stage .nested."):
        personalize("nested-lora", base, task_, train, budget=8, config=replace(CONFIG, max_rank=8), artifact=factors)

