"""LoRA with the same rank r in every target module (docs/method.md, "Baselines")."""

from __future__ import annotations

import torch

from fedp2eft.core.btlora import resolve_target_modules
from fedp2eft.core.personalization import ClientContext, PersonalizeConfig, Personalized, RunPlan, lora_plan, \
    personal_lora, train_metrics
from fedp2eft.core.methods.registry import MethodSpec
from fedp2eft.core.training import train


def uniform_ranks(context: ClientContext, budget: int, config: PersonalizeConfig) -> dict[str, int]:
    return dict.fromkeys(resolve_target_modules(context.base_model, config.target_modules), budget)


def personalize_lora(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    ranks = uniform_ranks(context, budget, config)
    model = personal_lora(context.base_model, ranks, config.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.finetune_lr(budget),
                                  weight_decay=0.0)
    result = train(model, context.task, context.examples, optimizer, config.epochs, config.batch_size,
                   seed=config.seed)
    return Personalized(model, ranks, train_metrics(result, model))


def plan_lora(context: ClientContext, budget: int, config: PersonalizeConfig) -> RunPlan:
    return lora_plan(uniform_ranks(context, budget, config), config, budget)


METHOD = MethodSpec("lora", personalize_lora, plan=plan_lora)
