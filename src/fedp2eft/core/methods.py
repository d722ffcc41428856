"""Personalization methods behind one API (SPEC §5, §7).

    result = personalize("fedp2eft", base_model, task, train_examples, budget=8, generator=psg)
    metrics = task.evaluate(result.model, test_examples)

Every method fine-tunes a LoRA on a shallow copy of the base model (see ``frozen_copy``) with the one training
loop of ``training.py``; the base model's weights are never modified."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from torch import nn

from fedp2eft.core.btlora import BTLoRAModel, PriorConfig, attach_lora, resolve_target_modules
from fedp2eft.core.budget import Selection, check_budget, select_top_ranks
from fedp2eft.core.features import client_features, feature_layer_names
from fedp2eft.core.generator import GeneratorSpec, PSGenerator
from fedp2eft.core.tasks import Task, iterate_batches
from fedp2eft.core.training import TrainResult, steps_per_epoch, train
from fedp2eft.errors import FedP2EFTError, config_from_mapping

LORA_SCALING = 2.0  # alpha = 2 * rank, as in the paper


@dataclass
class PersonalizeConfig:
    """Paper defaults (SPEC §2, §5, §7)."""

    max_rank: int = 32
    epochs: int = 2
    batch_size: int = 16
    lora_lr: float = 1e-4
    scale_lr: float = 1e-2
    adalora_lr: float = 1e-3
    bayestune_epochs: int = 2
    priors: PriorConfig = field(default_factory=PriorConfig)
    target_modules: list[str] | None = None
    seed: int = 0

    @classmethod
    def from_dict(cls, raw: dict) -> PersonalizeConfig:
        """From a YAML/JSON mapping (``priors`` nested); unknown keys are named in the error."""
        raw = dict(raw)
        priors = config_from_mapping(PriorConfig, raw.pop("priors", {}), "personalize.priors")
        return config_from_mapping(cls, {**raw, "priors": priors}, "personalize")


@dataclass
class Personalized:
    """A personalized model ready for ``task.evaluate`` and the ranks its LoRA modules got."""

    model: nn.Module
    ranks: dict[str, int]
    metrics: dict[str, float]

    def export(self, directory: str | Path) -> None:
        """Save as a standard PEFT adapter (per-module ranks, lambda folded into B)."""
        peft_model = self.model.fold_scales() if isinstance(self.model, BTLoRAModel) else self.model
        peft_model.save_pretrained(str(directory))


def frozen_copy(base_model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares the base model's parameters instead of duplicating them.

    PEFT swaps modules in the copy's tree only and freezes the (shared) base weights, so many personalized
    models can live side by side at the cost of their LoRA weights, not of the whole model."""
    return copy.deepcopy(base_model, memo={id(p): p for p in base_model.parameters()})


def generator_spec(base_model: nn.Module, config: PersonalizeConfig, base_model_name: str) -> GeneratorSpec:
    """The layout a PS generator for this base model and config must have."""
    targets = resolve_target_modules(base_model, config.target_modules)
    return GeneratorSpec(
        base_model=base_model_name,
        module_names=tuple(targets),
        rank=config.max_rank,
        feature_layers=tuple(feature_layer_names(base_model, targets)),
    )


def features_for(base_model: nn.Module, task: Task, examples: list[dict], spec: GeneratorSpec,
                 batch_size: int = 32) -> torch.Tensor:
    return client_features(base_model, iterate_batches(examples, task.collate, batch_size), list(spec.feature_layers))


def new_btlora(base_model: nn.Module, config: PersonalizeConfig, init_scales: float = 1e-4) -> BTLoRAModel:
    """A fresh full-rank (R everywhere) BT-LoRA on a copy of the base model, lambda trainable."""
    targets = resolve_target_modules(base_model, config.target_modules)
    return BTLoRAModel(
        frozen_copy(base_model), {name: config.max_rank for name in targets}, LORA_SCALING,
        init_scales=init_scales, priors=config.priors, lora_seed=config.seed,
    )


def train_btlora(model: BTLoRAModel, task: Task, examples: list[dict], config: PersonalizeConfig,
                 epochs: int) -> TrainResult:
    """BayesTune: LoRA and lambda together, task loss plus both priors (lambda in its own LR group)."""
    model.snapshot_b()
    optimizer = torch.optim.AdamW(
        [{"params": model.lora_parameters(), "lr": config.lora_lr},
         {"params": model.scale_parameters(), "lr": config.scale_lr}],
        weight_decay=0.0,
    )
    return train(model, task, examples, optimizer, epochs, config.batch_size, seed=config.seed,
                 extra_loss=lambda: model.prior_loss(len(examples)))


def finetune_selection(base_model: nn.Module, selection: Selection, task: Task, examples: list[dict],
                       config: PersonalizeConfig) -> Personalized:
    """SPEC §5 steps 3-4: a fresh LoRA with the kept ranks, kept lambdas as fixed multipliers, fine-tuned."""
    model = BTLoRAModel(frozen_copy(base_model), selection.ranks, LORA_SCALING, init_scales=selection.values,
                        trainable_scales=False, lora_seed=config.seed)
    optimizer = torch.optim.AdamW(model.lora_parameters(), lr=config.lora_lr, weight_decay=0.0)
    result = train(model, task, examples, optimizer, config.epochs, config.batch_size, seed=config.seed)
    return Personalized(model, selection.ranks, _train_metrics(result, model))


def _train_metrics(result: TrainResult, model: nn.Module) -> dict[str, float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"train_loss_first_epoch": result.epoch_losses[0], "train_loss_last_epoch": result.epoch_losses[-1],
            "steps": result.steps, "trainable_parameters": trainable}


def personalize_lora(base_model: nn.Module, task: Task, examples: list[dict], budget: int,
                     config: PersonalizeConfig, generator: PSGenerator | None) -> Personalized:
    targets = resolve_target_modules(base_model, config.target_modules)
    ranks = {name: budget for name in targets}
    model = attach_lora(frozen_copy(base_model), ranks, LORA_SCALING, seed=config.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lora_lr,
                                  weight_decay=0.0)
    result = train(model, task, examples, optimizer, config.epochs, config.batch_size, seed=config.seed)
    return Personalized(model, ranks, _train_metrics(result, model))


def personalize_adalora(base_model: nn.Module, task: Task, examples: list[dict], budget: int,
                        config: PersonalizeConfig, generator: PSGenerator | None) -> Personalized:
    targets = resolve_target_modules(base_model, config.target_modules)
    total = config.epochs * steps_per_epoch(len(examples), config.batch_size)
    init_r = max(budget + 1, round(1.5 * budget))
    adalora = AdaLoraConfig(
        target_r=budget, init_r=init_r, lora_alpha=LORA_SCALING * budget, lora_dropout=0.0,
        tinit=int(0.1 * total), tfinal=int(0.3 * total), deltaT=1, orth_reg_weight=0.1, total_step=total,
        target_modules=targets,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model: PeftModel = get_peft_model(frozen_copy(base_model), adalora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.adalora_lr,
                                  weight_decay=0.0)
    result = train(model, task, examples, optimizer, config.epochs, config.batch_size, seed=config.seed,
                   after_step=model.base_model.update_and_allocate)
    return Personalized(model, _adalora_ranks(model), _train_metrics(result, model))


def _adalora_ranks(model: PeftModel) -> dict[str, int]:
    """Ranks left after AdaLoRA's budget allocation: the entries of lora_E it has not zeroed."""
    return {name: int((module.lora_E["default"] != 0).sum())
            for name, module in model.get_base_model().named_modules()
            if "default" in getattr(module, "lora_E", {})}


def personalize_btlora(base_model: nn.Module, task: Task, examples: list[dict], budget: int,
                       config: PersonalizeConfig, generator: PSGenerator | None) -> Personalized:
    bayestune = new_btlora(base_model, config)
    search = train_btlora(bayestune, task, examples, config, config.bayestune_epochs)
    selection = select_top_ranks(bayestune.scales(), bayestune.module_names, config.max_rank, budget)
    del bayestune
    result = finetune_selection(base_model, selection, task, examples, config)
    result.metrics["search_loss_last_epoch"] = search.epoch_losses[-1]
    return result


def personalize_fedp2eft(base_model: nn.Module, task: Task, examples: list[dict], budget: int,
                         config: PersonalizeConfig, generator: PSGenerator | None) -> Personalized:
    if generator is None:
        raise FedP2EFTError("method 'fedp2eft' needs a trained PS generator (train one with `fedp2eft train-psg`)")
    expected = generator_spec(base_model, config, generator.spec.base_model)
    if reason := generator.spec.mismatch(expected):
        raise FedP2EFTError(f"the PS generator does not fit this base model ({reason}); use the generator trained "
                            f"for this model and target modules")
    with torch.no_grad():
        scales = generator(features_for(base_model, task, examples, expected))
    selection = select_top_ranks(scales, list(expected.module_names), config.max_rank, budget)
    return finetune_selection(base_model, selection, task, examples, config)


Method = Callable[[nn.Module, Task, list[dict], int, PersonalizeConfig, PSGenerator | None], Personalized]
METHODS: dict[str, Method] = {
    "lora": personalize_lora,
    "adalora": personalize_adalora,
    "btlora": personalize_btlora,
    "fedp2eft": personalize_fedp2eft,
}


def personalize(method: str, base_model: nn.Module, task: Task, train_examples: list[dict], budget: int,
                config: PersonalizeConfig | None = None, generator: PSGenerator | None = None) -> Personalized:
    """Personalize a copy of ``base_model`` on one client's training examples under rank budget ``budget``."""
    config = config or PersonalizeConfig()
    if method not in METHODS:
        raise FedP2EFTError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")
    check_budget(budget, config.max_rank)
    task.check(train_examples, "the client's training set")
    torch.manual_seed(config.seed)
    return METHODS[method](base_model, task, train_examples, budget, config, generator)
