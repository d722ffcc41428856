"""PEFT's AdaLoRA with the reference settings (docs/method.md, "Baselines")."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import AdaLoraConfig, PeftModel

from fedp2eft.core.btlora import attach_adalora, resolve_target_modules
from fedp2eft.core.modeling import adapter_carried_modules
from fedp2eft.core.multi_lora import LoRARun
from fedp2eft.core.personalization import LEARNING_RATE, ClientContext, PersonalizeConfig, Personalized, RunPlan, \
    frozen_copy, train_metrics
from fedp2eft.core.methods.registry import MethodSpec
from fedp2eft.core.training import steps_per_epoch, train


@dataclass
class AdaLoRASettings:
    """AdaLoRA's own setting, a key of the ``personalize:`` section: its learning rate (the paper's, 10x LoRA's)."""

    adalora_lr: float = field(default=1e-3, metadata=LEARNING_RATE)


def adalora_lr(config: PersonalizeConfig) -> float:
    return config.settings("adalora", AdaLoRASettings).adalora_lr


def adalora_config(context: ClientContext, budget: int, config: PersonalizeConfig) -> AdaLoraConfig:
    """The reference settings: ``init_r`` 1.5 r, pruning after the first 10% of the steps until the last 30%.
    ``lora_alpha`` is left at PEFT's default, so the scaling is alpha / init_r as in the paper's runs."""
    targets = resolve_target_modules(context.base_model, config.target_modules)
    total = config.epochs * steps_per_epoch(len(context.examples), config.batch_size)
    return AdaLoraConfig(
        target_r=budget, init_r=max(budget + 1, round(1.5 * budget)), lora_dropout=0.0, tinit=int(0.1 * total),
        tfinal=int(0.3 * total), deltaT=1, orth_reg_weight=0.1, total_step=total, target_modules=targets,
        modules_to_save=adapter_carried_modules(context.base_model) or None,
    )


def plan_adalora(context: ClientContext, budget: int, config: PersonalizeConfig) -> RunPlan:
    """``personalize_adalora`` as a plan: the batched pass runs PEFT's AdaLoRA of the same config
    (``core/multi_lora.py`` with ``core/rank_allocation.py``)."""
    adalora = adalora_config(context, budget, config)
    ranks = {name: adalora.init_r for name in adalora.target_modules}
    return RunPlan(LoRARun(ranks, adalora_lr(config), config.seed, adalora=adalora), config.epochs, config.batch_size)


def personalize_adalora(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    """PEFT's AdaLoRA at ``adalora_config``, trained alone (the ``personalize`` command's path)."""
    adalora = adalora_config(context, budget, config)
    model = attach_adalora(frozen_copy(context.base_model), adalora, config.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=adalora_lr(config),
                                  weight_decay=0.0)
    # Trained through PEFT's AdaLoraModel, whose forward adds the orthogonality penalty to the loss: a PeftModel
    # without a task type calls the wrapped model directly and would skip it.
    result = train(model.base_model, context.task, context.examples, optimizer, config.epochs, config.batch_size,
                   seed=config.seed, after_step=model.base_model.update_and_allocate)
    return Personalized(model, allocated_ranks(model), train_metrics(result, model))


def allocated_ranks(model: PeftModel) -> dict[str, int]:
    """Ranks left after AdaLoRA's budget allocation: the entries of lora_E it has not zeroed."""
    return {name: int((module.lora_E["default"] != 0).sum())
            for name, module in model.get_base_model().named_modules()
            if "default" in getattr(module, "lora_E", {})}


METHOD = MethodSpec("adalora", personalize_adalora, lr_field="adalora_lr", reports=("ranks",), plan=plan_adalora,
                    settings=AdaLoRASettings)
