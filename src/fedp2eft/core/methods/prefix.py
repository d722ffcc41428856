"""Personalization shared by the budget-heterogeneous peers (nested-rank LoRA, HetLoRA, FlexLoRA): a client of
budget r starts a rank-r LoRA from the first r components of its stage's rank-R factors (``core/prefix_lora.py``)
and fine-tunes it like uniform LoRA, at LoRA's learning rate; the peers differ only in their federated stage."""

from __future__ import annotations

import torch

from fedp2eft.core.personalization import ClientContext, PersonalizeConfig, Personalized, RunPlan, finetune_lora, \
    lora_plan, personal_lora
from fedp2eft.core.methods.registry import MethodSpec, Stage
from fedp2eft.core.prefix_lora import Factors, leading
from fedp2eft.errors import FedP2EFTError


def prefix_method(name: str, stage: Stage) -> MethodSpec:
    """The method ``name`` that personalizes from the factors ``stage`` trained."""

    def start(context: ClientContext, budget: int) -> Factors:
        factors = context.artifacts.get(stage.name)
        if factors is None:
            raise FedP2EFTError(f"method '{name}' needs its trained rank-R LoRA: {stage.how_to_get}")
        max_rank = next(iter(factors.values()))[0].shape[0]
        if not 1 <= budget <= max_rank:
            raise FedP2EFTError(f"budget r={budget} does not fit the rank-{max_rank} LoRA of stage '{stage.name}'; "
                                f"train one with personalize.max_rank >= {budget}")
        return leading(factors, budget)

    def personalize(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
        cut = start(context, budget)
        ranks = dict.fromkeys(cut, budget)
        model = personal_lora(context.base_model, ranks, config.seed)
        modules = dict(model.base_model.model.named_modules())
        with torch.no_grad():
            for module, (a, b) in cut.items():
                modules[module].lora_A["default"].weight.copy_(a)
                modules[module].lora_B["default"].weight.copy_(b)
        return finetune_lora(context, model, ranks, budget, config)

    def plan(context: ClientContext, budget: int, config: PersonalizeConfig) -> RunPlan:
        cut = start(context, budget)
        planned = lora_plan(dict.fromkeys(cut, budget), config, budget)
        planned.run.start = cut
        return planned

    return MethodSpec(name, personalize, stage=stage, plan=plan)
