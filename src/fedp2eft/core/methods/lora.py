"""LoRA with the same rank r in every target module (docs/method.md, "Baselines")."""

from __future__ import annotations

import torch

from fedp2eft.core.btlora import resolve_target_modules
from fedp2eft.core.personalization import ClientContext, PersonalizeConfig, Personalized, personal_lora, train_metrics
from fedp2eft.core.methods.registry import MethodSpec
from fedp2eft.core.training import train


def personalize_lora(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    targets = resolve_target_modules(context.base_model, config.target_modules)
    ranks = {name: budget for name in targets}
    model = personal_lora(context.base_model, ranks, config.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lora_lr,
                                  weight_decay=0.0)
    result = train(model, context.task, context.examples, optimizer, config.epochs, config.batch_size,
                   seed=config.seed)
    return Personalized(model, ranks, train_metrics(result, model))


METHOD = MethodSpec("lora", personalize_lora)
