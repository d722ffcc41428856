"""Nested-rank LoRA, a budget-heterogeneous peer (docs/method.md, "Nested-rank LoRA"): a rank-R LoRA trained
federatedly with a random rank per local step, cut at the client's budget r (its first r components) and
fine-tuned there like uniform LoRA. The mathematics and the federated job live in ``core/nested_lora.py``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedp2eft.core.nested_lora import STAGE_NAME, Factors, NestedLoRAConfig, NestedLoRATask, leading, load_nested
from fedp2eft.core.personalization import ClientContext, PersonalizeConfig, Personalized, RunPlan, finetune_lora, \
    lora_plan, personal_lora
from fedp2eft.core.methods.registry import MethodSpec, Stage
from fedp2eft.core.tasks import Task
from fedp2eft.data.types import ClientData
from fedp2eft.errors import FedP2EFTError


def build_task(base_model: nn.Module, task: Task, clients: list[ClientData], training: dict, base_model_name: str,
               budgets: list[int]) -> NestedLoRATask:
    """One adapter of rank R serves every budget (``budgets`` is not needed)."""
    return NestedLoRATask(base_model, task, clients, NestedLoRAConfig.from_dict(training), base_model_name)


def load(path: Path, base_model: nn.Module, config: PersonalizeConfig, base_model_name: str) -> Factors:
    return load_nested(path, base_model, config)


STAGE = Stage(
    name=STAGE_NAME, title="the nested-rank LoRA (rank R, cut at each budget)", build=build_task,
    config_class=NestedLoRAConfig, load=load,
    # its local training runs at the rate validation chose for uniform LoRA
    defaults={"rounds": 20, "clients_per_round": 4, "lr_scale": "lora", "training": {}},
    how_to_get="let `fedp2eft benchmark` train it (stage `nested`) or point --artifact at its nested_lora.safetensors",
)


def start(context: ClientContext, budget: int) -> Factors:
    """The federated adapter's first ``budget`` components: where this client's fine-tuning starts."""
    factors = context.artifacts.get(STAGE_NAME)
    if factors is None:
        raise FedP2EFTError(f"method 'nested-lora' needs a trained nested-rank LoRA: {STAGE.how_to_get}")
    max_rank = next(iter(factors.values()))[0].shape[0]
    if not 1 <= budget <= max_rank:
        raise FedP2EFTError(f"budget r={budget} does not fit a nested-rank LoRA of rank {max_rank}; train one with "
                            f"personalize.max_rank >= {budget}")
    return leading(factors, budget)


def personalize(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    cut = start(context, budget)
    ranks = dict.fromkeys(cut, budget)
    model = personal_lora(context.base_model, ranks, config.seed)
    modules = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        for name, (a, b) in cut.items():
            modules[name].lora_A["default"].weight.copy_(a)
            modules[name].lora_B["default"].weight.copy_(b)
    return finetune_lora(context, model, ranks, budget, config)


def plan(context: ClientContext, budget: int, config: PersonalizeConfig) -> RunPlan:
    cut = start(context, budget)
    planned = lora_plan(dict.fromkeys(cut, budget), config, budget)
    planned.run.start = cut
    return planned


METHOD = MethodSpec("nested-lora", personalize, stage=STAGE, plan=plan)
