"""Federated nested-rank LoRA (DyLoRA-style; docs/method.md, "Budget-heterogeneous peers"), engine-free: one LoRA of the
maximum rank R on every target module is trained with FedAvg, and each local step of a client trains only its
leading b components for a b drawn uniformly from 1..R. The components are then ordered by how much they matter
to every smaller rank, so the averaged adapter can be cut at any budget r <= R (its first r components) and
fine-tuned there: one federated training serves every budget, the promise the PS generator makes too. The factors'
layout, file and cut are the peers' common ground (``core/prefix_lora.py``)."""

from __future__ import annotations

import torch

from fedp2eft.core.artifacts import ArtifactKind
from fedp2eft.core.btlora import LORA_SCALING, BTLoRAModel
from fedp2eft.core.federation import ClientUpdate
from fedp2eft.core.modeling import adapter_carried_modules, frozen_copy
from fedp2eft.core.prefix_lora import FactorsArtifact, PrefixLoRATask, from_weights, to_weights
from fedp2eft.core.training import steps_per_epoch, train

STAGE_NAME = "nested"
ARTIFACT = FactorsArtifact("nested_lora.safetensors", ArtifactKind(
    "fedp2eft_nested_lora", "nested-rank LoRA",
    "let `fedp2eft benchmark` train one (stage `nested`) or point --artifact at its file"))


def step_ranks(seed: int, server_round: int, client_index: int, steps: int, max_rank: int) -> list[int]:
    """The rank b of each local step of one client's round, uniform in 1..max_rank, reproducible from the run's
    seed, the round and the client."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + server_round * 10_007 + client_index)
    return torch.randint(1, max_rank + 1, (steps,), generator=generator).tolist()


class NestedLoRATask(PrefixLoRATask):
    """Nested-rank LoRA's federated job over the seen clients; implements ``FederatedTask`` and ``ExportableTask``."""

    artifact = ARTIFACT

    def client_update(self, weights: dict[str, torch.Tensor], client_index: int, server_round: int) -> ClientUpdate:
        config, personal = self.config, self.config.personalize
        client = self.clients[client_index]
        torch.manual_seed(config.seed * 100_003 + server_round * 1_009 + client_index)  # dropout masks
        model = BTLoRAModel(frozen_copy(self.base_model), self.ranks, LORA_SCALING, init_scales=1.0,
                            trainable_scales=False, lora_seed=config.seed,
                            carry=adapter_carried_modules(self.base_model))
        layers = model.lora_layers
        with torch.no_grad():
            for name, (a, b) in from_weights(weights).items():
                layers[name].lora_A[model.adapter_name].weight.copy_(a)
                layers[name].lora_B[model.adapter_name].weight.copy_(b)
        steps = config.local_epochs * steps_per_epoch(len(client.train), personal.batch_size)
        ranks = step_ranks(config.seed, server_round, client_index, steps, personal.max_rank)
        rank_positions = torch.arange(personal.max_rank)

        def use_rank(rank: int) -> None:  # the gates switch the trailing components off: no output, no gradient
            model.set_masks({name: rank_positions < rank for name in model.module_names})

        use_rank(ranks[0])
        optimizer = torch.optim.AdamW(model.lora_parameters(), lr=personal.lora_lr, weight_decay=0.0)
        result = train(model, self.task, client.train, optimizer, config.local_epochs, personal.batch_size,
                       seed=config.seed * 1_000 + server_round,
                       after_step=lambda step: use_rank(ranks[min(step + 1, steps - 1)]))
        trained = {name: (layers[name].lora_A[model.adapter_name].weight.detach().clone(),
                          layers[name].lora_B[model.adapter_name].weight.detach().clone()) for name in self.ranks}
        metrics = {"train_loss": result.epoch_losses[-1], "mean_step_rank": sum(ranks) / len(ranks)}
        return ClientUpdate(to_weights(trained), len(client.train), metrics)
