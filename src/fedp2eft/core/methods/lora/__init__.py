"""LoRA with the same rank r in every target module (docs/method.md, "Baselines")."""

from __future__ import annotations

from fedp2eft.core.btlora import resolve_target_modules
from fedp2eft.core.personalization import ClientContext, PersonalizeConfig, Personalized, RunPlan, finetune_lora, \
    lora_plan, personal_lora
from fedp2eft.core.methods.registry import MethodSpec


def uniform_ranks(context: ClientContext, budget: int, config: PersonalizeConfig) -> dict[str, int]:
    return dict.fromkeys(resolve_target_modules(context.base_model, config.target_modules), budget)


def personalize_lora(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    ranks = uniform_ranks(context, budget, config)
    return finetune_lora(context, personal_lora(context.base_model, ranks, config.seed), ranks, budget, config)


def plan_lora(context: ClientContext, budget: int, config: PersonalizeConfig) -> RunPlan:
    return lora_plan(uniform_ranks(context, budget, config), config, budget)


METHOD = MethodSpec("lora", personalize_lora, plan=plan_lora)
