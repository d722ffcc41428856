"""What every personalization method shares: its config, its result, a client's shared work, BayesTune
training (local BT-LoRA and stage 1 of the PS generator's federated training) and the fine-tuning of a LoRA with
fixed per-module ranks (docs/method.md, "Personalization" and "Baselines"). The methods themselves live in
``core/methods/``; the federated stages import from here, not from there, so the two never import each other.

Every method fine-tunes a LoRA on a shallow copy of the base model (``frozen_copy``) with the one training loop
of ``core/training.py``; the base model's weights are never modified."""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft import PeftModel
from torch import nn

from fedp2eft.core.btlora import LORA_SCALING, SCALE_MIN, BTLoRAModel, PriorConfig, attach_lora, resolve_target_modules
from fedp2eft.core.budget import Selection
from fedp2eft.core.features import client_features, feature_layer_names
from fedp2eft.core.generator import GeneratorSpec
from fedp2eft.core.modeling import adapter_carried_modules, frozen_copy
from fedp2eft.core.multi_lora import LoRARun, MultiLoRAModel
from fedp2eft.core.tasks import Task, iterate_batches
from fedp2eft.core.training import TrainResult, train
from fedp2eft.errors import FedP2EFTError, config_from_mapping

REFERENCE_RANK = 2  # the budget at which ``rank_lr_exponent`` leaves lora_lr as it is: the paper's smallest
LEARNING_RATE = {"learning_rate": True}  # field metadata of a setting that ``with_lr_scale`` multiplies
Settings = TypeVar("Settings")


def scaled_rates(settings: Settings, factor: float) -> Settings:
    """``settings`` (a dataclass) with every field marked ``LEARNING_RATE`` times ``factor``."""
    return replace(settings, **{item.name: getattr(settings, item.name) * factor for item in fields(settings)
                                if item.metadata.get("learning_rate")})


@dataclass
class PersonalizeConfig:
    """What every method's personalization shares, at the paper's defaults (docs/method.md). ``scale_lr``,
    ``bayestune_epochs`` and ``priors`` are BayesTune's, shared by local BT-LoRA and the PS generator's federated
    stage. A method's own settings (AdaLoRA's learning rate, ...) are a dataclass of its own (``MethodSpec.settings``)
    whose fields sit beside these in the ``personalize:`` section; ``settings`` reads them."""

    max_rank: int = 32
    epochs: int = 2
    batch_size: int = 16
    lora_lr: float = field(default=1e-4, metadata=LEARNING_RATE)
    scale_lr: float = field(default=1e-2, metadata=LEARNING_RATE)
    bayestune_epochs: int = 2
    priors: PriorConfig = field(default_factory=PriorConfig)
    target_modules: list[str] | None = None
    seed: int = 0
    # LoRA's fine-tuning rate at budget r is lora_lr x (REFERENCE_RANK / r) ** rank_lr_exponent: 0 keeps one rate
    # for every rank (the paper); 1 makes a rank-r update's size under Adam independent of r, as AdaLoRA's alpha / r
    # scaling does (docs/method.md, "Learning rate and rank"). Not applied to AdaLoRA, FedL2P or the BayesTune search.
    rank_lr_exponent: float = 0.0
    own: dict[str, Any] = field(default_factory=dict)  # methods' own settings as configured, by method name
    own_lr_scale: float = 1.0  # what ``with_lr_scale`` multiplied, applied to a method's own rates as they are read

    @classmethod
    def shared_keys(cls) -> set[str]:
        """The keys of the ``personalize:`` section that every method shares (the methods' own come beside them)."""
        return {item.name for item in fields(cls)} - {"own", "own_lr_scale"}

    @classmethod
    def from_dict(cls, raw: dict, own_settings: Mapping[str, type] | None = None) -> PersonalizeConfig:
        """From a YAML/JSON mapping (``priors`` nested); a key that names a field of a method's own settings class
        (``own_settings``: method name -> class) goes to that method; other unknown keys are named in the error."""
        raw = dict(raw)
        priors = config_from_mapping(PriorConfig, raw.pop("priors", {}), "personalize.priors")
        own = {}
        for method, kind in (own_settings or {}).items():
            given = {item.name: raw.pop(item.name) for item in fields(kind) if item.name in raw}
            if given:
                own[method] = kind(**given)
        shared = cls.shared_keys()
        if unknown := sorted(set(raw) - shared):
            known = sorted(shared | {item.name for kind in (own_settings or {}).values() for item in fields(kind)})
            raise FedP2EFTError(f"personalize: unknown key(s) {unknown}; known keys: {', '.join(known)}")
        return cls(**raw, priors=priors, own=own)

    def with_lr_scale(self, factor: float) -> PersonalizeConfig:
        """Every learning rate times ``factor``, each method's own included: the paper's ratios (lambda 100x LoRA,
        AdaLoRA 10x) are kept, so one number per method is what a learning-rate search has to choose."""
        return replace(scaled_rates(self, factor), own_lr_scale=self.own_lr_scale * factor)

    def settings(self, method: str, kind: type[Settings]) -> Settings:
        """``method``'s own settings (its ``MethodSpec.settings`` class ``kind``): as configured, else its defaults;
        their learning rates times the scale ``with_lr_scale`` applied."""
        return scaled_rates(self.own[method] if method in self.own else kind(), self.own_lr_scale)

    def finetune_lr(self, budget: int) -> float:
        """The rate a LoRA of budget ``budget`` (mean rank per module) fine-tunes at (``rank_lr_exponent``)."""
        return self.lora_lr * (REFERENCE_RANK / budget) ** self.rank_lr_exponent


@dataclass
class Personalized:
    """A personalized model ready for ``task.evaluate``, the ranks its LoRA modules got, and what else the method
    reports per run (e.g. the kept lambda multipliers per module, under ``report["lambdas"]``)."""

    model: nn.Module
    ranks: dict[str, int]
    metrics: dict[str, float]
    report: dict[str, Any] = field(default_factory=dict)
    run: int | None = None  # this result's run in ``model`` when it is a MultiLoRAModel that trained several

    def export(self, directory: str | Path) -> None:
        """Save as a standard PEFT adapter (per-module ranks, lambda folded into B) whose config names its base
        model (the checkpoint folder or hub id the base was loaded from)."""
        if self.run is not None:
            peft_model = self.model.export(self.run)
        else:
            peft_model = self.model.fold_scales() if isinstance(self.model, BTLoRAModel) else self.model
        base_name = getattr(peft_model.get_base_model().config, "_name_or_path", "") or None
        for adapter in peft_model.peft_config.values():
            adapter.base_model_name_or_path = adapter.base_model_name_or_path or base_name
        peft_model.save_pretrained(str(directory))


def personal_lora(base_model: nn.Module, ranks: dict[str, int], seed: int) -> PeftModel:
    """A fresh LoRA with ``ranks`` (alpha = 2 x rank) on a ``frozen_copy`` of the base model, its init drawn from
    ``seed``; its adapter carries the classifier's head, so it reproduces its predictions on the plain encoder."""
    return attach_lora(frozen_copy(base_model), ranks, LORA_SCALING, seed=seed,
                       carry=adapter_carried_modules(base_model))


def finetune_lora(context: ClientContext, model: PeftModel, ranks: dict[str, int], budget: int,
                  config: PersonalizeConfig) -> Personalized:
    """Fine-tune a PEFT LoRA ``model`` (with ``ranks``) on the client's data at the rate of ``budget``."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.finetune_lr(budget),
                                  weight_decay=0.0)
    result = train(model, context.task, context.examples, optimizer, config.epochs, config.batch_size,
                   seed=config.seed)
    return Personalized(model, ranks, train_metrics(result, model))


def validation_split(examples: list[dict], fraction: float, key: int | str) -> tuple[list[dict], list[dict]]:
    """A split of a client's *training* data into (inner-train, validation), seeded by ``key`` (a seed or a client
    id), each part in the original order and neither empty: learning-rate selection and FedL2P's meta-training
    hold out validation data this way, so no test example ever chooses anything. Examples that carry a ``group``
    (rows that share content, e.g. one document's pieces) are held out whole groups at a time: a validation row
    whose group was trained on measures memory, not what the choice is for (docs/discussion.md, "A trap found on
    the way")."""
    units = _units(examples)
    if len(units) < 2:
        what = "groups" if len(units) < len(examples) else "training examples"
        raise FedP2EFTError(f"holding out validation data needs at least 2 {what} per client (got {len(units)}); "
                            "give the client more data")
    count = min(len(units) - 1, max(1, round(fraction * len(units))))
    held = {index for unit in random.Random(key).sample(units, count) for index in unit}
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def _units(examples: list[dict]) -> list[tuple[int, ...]]:
    """The indices that are held out together: one example each, or all examples of one ``group``."""
    if not any("group" in example for example in examples):
        return [(i,) for i in range(len(examples))]
    groups: dict[Any, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(example.get("group", ("ungrouped", i)), []).append(i)
    return [tuple(indices) for indices in groups.values()]


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


class ClientContext:
    """One client's data, the artifacts of federated stages (by stage name: a PS generator, meta-nets, ...) and
    the work its personalization runs share, computed on first use and kept (``shared``): meta-features, the
    generator's Lambda, BayesTune searches. A client personalized under every budget pays for those once."""

    def __init__(self, base_model: nn.Module, task: Task, examples: list[dict],
                 artifacts: dict[str, Any] | None = None) -> None:
        task.check(examples, "the client's training set")
        self.base_model = base_model
        self.task = task
        self.examples = examples
        self.artifacts = dict(artifacts or {})
        self._shared: dict[Hashable, Any] = {}

    def has(self, key: Hashable) -> bool:
        return key in self._shared

    def shared(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is asked for, the kept value afterwards."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    def features(self, spec: GeneratorSpec) -> torch.Tensor:
        """x for this client (depends only on the base model, the data and the feature layers)."""
        return self.shared(("features", spec.feature_layers),
                           lambda: features_for(self.base_model, self.task, self.examples, spec))


def new_btlora(base_model: nn.Module, config: PersonalizeConfig, init_scales: float = 1e-4) -> BTLoRAModel:
    """A fresh full-rank (R everywhere) BT-LoRA on a copy of the base model, lambda trainable."""
    targets = resolve_target_modules(base_model, config.target_modules)
    return BTLoRAModel(
        frozen_copy(base_model), {name: config.max_rank for name in targets}, LORA_SCALING,
        init_scales=init_scales, priors=config.priors, lora_seed=config.seed,
        carry=adapter_carried_modules(base_model),
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


def train_metrics(result: TrainResult, model: nn.Module | int) -> dict[str, float]:
    """The training metrics of a result: losses, steps and the trainable parameters of ``model`` (or their count,
    for one run of a pass that trains several)."""
    trainable = model if isinstance(model, int) else sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"train_loss_first_epoch": result.epoch_losses[0], "train_loss_last_epoch": result.epoch_losses[-1],
            "steps": result.steps, "trainable_parameters": trainable}


def finetune_selection(context: ClientContext, selection: Selection, config: PersonalizeConfig, budget: int,
                       unit_scales: bool = False) -> Personalized:
    """docs/method.md, personalization steps 3-4: a fresh LoRA with the kept ranks and the kept lambdas as fixed
    multipliers (all 1 with ``unit_scales``: the rank structure alone), fine-tuned on the client's data at the
    rate of ``budget``."""
    plan = selection_plan(selection, config, budget, unit_scales)
    model = BTLoRAModel(frozen_copy(context.base_model), selection.ranks, LORA_SCALING, init_scales=plan.run.scales,
                        trainable_scales=False, lora_seed=config.seed,
                        carry=adapter_carried_modules(context.base_model))
    optimizer = torch.optim.AdamW(model.lora_parameters(), lr=plan.run.lr, weight_decay=0.0)
    result = train(model, context.task, context.examples, optimizer, config.epochs, config.batch_size,
                   seed=config.seed)
    return Personalized(model, selection.ranks, train_metrics(result, model), plan.report)


@dataclass
class RunPlan:
    """A LoRA-shaped personalization run described rather than trained, so that a client's runs can train together
    in one pass (``train_plans``): the run, its epochs and what its result reports besides the training metrics."""

    run: LoRARun
    epochs: int
    batch_size: int
    report: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def lora_plan(ranks: dict[str, int], config: PersonalizeConfig, budget: int) -> RunPlan:
    """A plain LoRA with ``ranks`` fine-tuned at the rate of ``budget``."""
    return RunPlan(LoRARun(ranks, config.finetune_lr(budget), config.seed), config.epochs, config.batch_size)


def selection_plan(selection: Selection, config: PersonalizeConfig, budget: int, unit_scales: bool = False
                   ) -> RunPlan:
    """``finetune_selection`` as a plan: the kept ranks with the kept lambdas (or all 1) as fixed multipliers."""
    values = {name: torch.ones_like(v) for name, v in selection.values.items()} if unit_scales else selection.values
    kept = {name: [round(float(v), 6) for v in values[name]] for name in selection.ranks}
    return RunPlan(LoRARun(selection.ranks, config.finetune_lr(budget), config.seed, scales=values), config.epochs,
                   config.batch_size, {"lambdas": kept, "tie_order": selection.tie_order})


def search_plan(context: ClientContext, config: PersonalizeConfig) -> RunPlan:
    """BayesTune's search (``new_btlora`` + ``train_btlora``) as a plan: rank R everywhere, lambda from 1e-4
    trained at ``config.scale_lr`` under the priors."""
    targets = resolve_target_modules(context.base_model, config.target_modules)
    scales = {name: torch.full((config.max_rank,), SCALE_MIN) for name in targets}
    run = LoRARun({name: config.max_rank for name in targets}, config.lora_lr, config.seed, scales=scales,
                  scale_lr=config.scale_lr, priors=config.priors)
    return RunPlan(run, config.bayestune_epochs, config.batch_size)


# Tokens one pass over the base model may hold, and logits it may hold (floats): a pass of K runs holds K copies of
# a batch, and its activations for the backward pass grow with them (about 0.8 MB per token on
# multilingual-e5-small). 2,048 tokens keep a worker near 2.5 GB and were no slower than larger passes
# (docs/method.md, "Many adapters in one pass", `benchmarks/many_adapters.py --grid --pass-tokens N`).
PASS_TOKENS = 2048
PASS_LOGITS = 2**28


def runs_per_pass(context: ClientContext, batch_size: int) -> int:
    """How many runs of ``context``'s client one pass takes: as many copies of an average batch as fit in
    ``PASS_TOKENS`` and ``PASS_LOGITS`` (a causal LM's logits hold its whole vocabulary per token)."""
    lengths = context.shared("mean_length", lambda: float(
        context.task.collate(context.examples)["attention_mask"].sum(1).float().mean()))
    tokens = batch_size * max(lengths, 1.0)
    width = context.base_model.config.vocab_size if context.task.kind == "instruction" else len(context.task.labels)
    return max(1, min(int(PASS_TOKENS // tokens), int(PASS_LOGITS // (tokens * width))))


def train_plans(context: ClientContext, plans: list[RunPlan]) -> list[Personalized]:
    """Train ``plans`` (one seed, epochs and batch size) together in one pass per step over the base model; each
    result equals what training its plan alone gives, to float rounding."""
    first = plans[0]
    model = MultiLoRAModel(context.base_model, context.task, [plan.run for plan in plans],
                           carry=adapter_carried_modules(context.base_model))
    searches = any(plan.run.searches for plan in plans)
    torch.manual_seed(first.run.seed)  # the stream a separate run starts from (dropout masks)
    result = train(model, context.task, context.examples, model.optimizer(), first.epochs, first.batch_size,
                   seed=first.run.seed,
                   extra_loss=(lambda: model.prior_loss(len(context.examples))) if searches else None)
    outcomes = []
    for index, plan in enumerate(plans):
        metrics = {**train_metrics(result.run(index), model.trainable_count(index)), **plan.metrics}
        outcomes.append(Personalized(model, model.kept_ranks(index), metrics, dict(plan.report), run=index))
    return outcomes
