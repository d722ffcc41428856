"""Personalization methods behind one API (docs/method.md, "Personalization" and "Baselines").

    result = personalize("fedp2eft", base_model, task, train_examples, budget=8, generator=psg)
    metrics = task.evaluate(result.model, test_examples)

Every method fine-tunes a LoRA on a shallow copy of the base model (see ``frozen_copy``) with the one training
loop of ``training.py``; the base model's weights are never modified. What several runs of one client share
(its meta-features, the generator's output, a BayesTune search) is computed once by a :class:`ClientContext`,
so a client personalized under every budget pays for those once."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
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
    """Paper defaults (docs/method.md)."""

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

    def with_lr_scale(self, factor: float) -> PersonalizeConfig:
        """Every learning rate times ``factor``: the paper's ratios (lambda 100x LoRA, AdaLoRA 10x) are kept,
        so one number per method is what a learning-rate search has to choose."""
        return replace(self, lora_lr=self.lora_lr * factor, scale_lr=self.scale_lr * factor,
                       adalora_lr=self.adalora_lr * factor)

    def method_lr(self, method: str) -> float:
        """The learning rate of ``method``'s LoRA weights (AdaLoRA has its own; every other method uses lora_lr)."""
        return self.adalora_lr if method == "adalora" else self.lora_lr


@dataclass
class Personalized:
    """A personalized model ready for ``task.evaluate``, the ranks its LoRA modules got and, for methods that keep
    lambda multipliers, the kept values per module."""

    model: nn.Module
    ranks: dict[str, int]
    metrics: dict[str, float]
    kept_scales: dict[str, list[float]] | None = None

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
    """The client's meta-features x (docs/method.md, "Client features"): from the inputs only, never labels."""
    return client_features(base_model, iterate_batches(examples, task.feature_collate, batch_size),
                           list(spec.feature_layers))


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


class ClientContext:
    """One client's data and the artifacts its personalization runs share, each computed on first use:
    meta-features, the generator's Lambda, and BayesTune searches (one per search setting, not per budget)."""

    def __init__(self, base_model: nn.Module, task: Task, examples: list[dict],
                 generator: PSGenerator | None = None) -> None:
        task.check(examples, "the client's training set")
        self.base_model = base_model
        self.task = task
        self.examples = examples
        self.generator = generator
        self._generated: torch.Tensor | None = None
        self._searches: dict[str, tuple[torch.Tensor, list[str], float]] = {}

    def generated_scales(self, config: PersonalizeConfig) -> tuple[torch.Tensor, list[str]]:
        """Lambda = PSG(x) for this client, with the module order it refers to."""
        if self.generator is None:
            raise FedP2EFTError("method 'fedp2eft' needs a trained PS generator (train one with `fedp2eft train-psg`)")
        expected = generator_spec(self.base_model, config, self.generator.spec.base_model)
        if reason := self.generator.spec.mismatch(expected):
            raise FedP2EFTError(f"the PS generator does not fit this base model ({reason}); use the generator "
                                f"trained for this model and target modules")
        if self._generated is None:
            with torch.no_grad():
                self._generated = self.generator(features_for(self.base_model, self.task, self.examples, expected))
        return self._generated, list(expected.module_names)

    def bayestune_scales(self, config: PersonalizeConfig) -> tuple[torch.Tensor, list[str], float]:
        """Lambda learned by local BayesTune from lambda = 1e-4, and the search's last-epoch task loss."""
        search = {key: value for key, value in asdict(config).items() if key not in ("epochs",)}
        key = repr(sorted(search.items()))
        if key not in self._searches:
            model = new_btlora(self.base_model, config)
            result = train_btlora(model, self.task, self.examples, config, config.bayestune_epochs)
            self._searches[key] = (model.scales().detach(), model.module_names, result.epoch_losses[-1])
        return self._searches[key]


def finetune_selection(context: ClientContext, selection: Selection, config: PersonalizeConfig,
                       unit_scales: bool = False) -> Personalized:
    """docs/method.md, personalization steps 3-4: a fresh LoRA with the kept ranks and the kept lambdas as fixed
    multipliers (all 1 with ``unit_scales``: the rank structure alone), fine-tuned on the client's data."""
    values = {name: torch.ones_like(v) for name, v in selection.values.items()} if unit_scales else selection.values
    model = BTLoRAModel(frozen_copy(context.base_model), selection.ranks, LORA_SCALING, init_scales=values,
                        trainable_scales=False, lora_seed=config.seed)
    optimizer = torch.optim.AdamW(model.lora_parameters(), lr=config.lora_lr, weight_decay=0.0)
    result = train(model, context.task, context.examples, optimizer, config.epochs, config.batch_size,
                   seed=config.seed)
    kept = {name: [round(float(v), 6) for v in values[name]] for name in selection.ranks}
    return Personalized(model, selection.ranks, _train_metrics(result, model), kept)


def _train_metrics(result: TrainResult, model: nn.Module) -> dict[str, float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"train_loss_first_epoch": result.epoch_losses[0], "train_loss_last_epoch": result.epoch_losses[-1],
            "steps": result.steps, "trainable_parameters": trainable}


def personalize_lora(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    targets = resolve_target_modules(context.base_model, config.target_modules)
    ranks = {name: budget for name in targets}
    model = attach_lora(frozen_copy(context.base_model), ranks, LORA_SCALING, seed=config.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lora_lr,
                                  weight_decay=0.0)
    result = train(model, context.task, context.examples, optimizer, config.epochs, config.batch_size,
                   seed=config.seed)
    return Personalized(model, ranks, _train_metrics(result, model))


def personalize_adalora(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    """PEFT's AdaLoRA with the reference settings; ``lora_alpha`` is left at PEFT's default, so the scaling is
    alpha / init_r as in the paper's runs (docs/method.md, "Baselines")."""
    targets = resolve_target_modules(context.base_model, config.target_modules)
    total = config.epochs * steps_per_epoch(len(context.examples), config.batch_size)
    init_r = max(budget + 1, round(1.5 * budget))
    adalora = AdaLoraConfig(
        target_r=budget, init_r=init_r, lora_dropout=0.0, tinit=int(0.1 * total), tfinal=int(0.3 * total),
        deltaT=1, orth_reg_weight=0.1, total_step=total, target_modules=targets,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model: PeftModel = get_peft_model(frozen_copy(context.base_model), adalora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.adalora_lr,
                                  weight_decay=0.0)
    result = train(model, context.task, context.examples, optimizer, config.epochs, config.batch_size,
                   seed=config.seed, after_step=model.base_model.update_and_allocate)
    return Personalized(model, _adalora_ranks(model), _train_metrics(result, model))


def _adalora_ranks(model: PeftModel) -> dict[str, int]:
    """Ranks left after AdaLoRA's budget allocation: the entries of lora_E it has not zeroed."""
    return {name: int((module.lora_E["default"] != 0).sum())
            for name, module in model.get_base_model().named_modules()
            if "default" in getattr(module, "lora_E", {})}


def personalize_btlora(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    scales, module_names, search_loss = context.bayestune_scales(config)
    selection = select_top_ranks(scales, module_names, config.max_rank, budget)
    result = finetune_selection(context, selection, config)
    result.metrics["search_loss_last_epoch"] = search_loss
    return result


def personalize_fedp2eft(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    scales, module_names = context.generated_scales(config)
    return finetune_selection(context, select_top_ranks(scales, module_names, config.max_rank, budget), config)


def personalize_fedp2eft_structure(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    """FedP²EFT's rank selection with every kept lambda set to 1: the generator's structure without its
    magnitude (the reference code's switch; docs/method.md, "Structure and magnitude")."""
    scales, module_names = context.generated_scales(config)
    selection = select_top_ranks(scales, module_names, config.max_rank, budget)
    return finetune_selection(context, selection, config, unit_scales=True)


Method = Callable[[ClientContext, int, PersonalizeConfig], Personalized]
METHODS: dict[str, Method] = {
    "lora": personalize_lora,
    "adalora": personalize_adalora,
    "btlora": personalize_btlora,
    "fedp2eft": personalize_fedp2eft,
    "fedp2eft-structure": personalize_fedp2eft_structure,
}
NEEDS_GENERATOR = ("fedp2eft", "fedp2eft-structure")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise FedP2EFTError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")


def personalize(method: str, base_model: nn.Module | ClientContext, task: Task | None = None,
                train_examples: list[dict] | None = None, budget: int = 8, config: PersonalizeConfig | None = None,
                generator: PSGenerator | None = None) -> Personalized:
    """Personalize a copy of ``base_model`` on one client's training examples under rank budget ``budget``.

    Pass a :class:`ClientContext` instead of (base_model, task, train_examples, generator) to share features,
    generator output and BayesTune searches between several runs of the same client."""
    config = config or PersonalizeConfig()
    check_method(method)
    check_budget(budget, config.max_rank)
    context = base_model if isinstance(base_model, ClientContext) else ClientContext(
        base_model, task, train_examples, generator)
    torch.manual_seed(config.seed)
    return METHODS[method](context, budget, config)
