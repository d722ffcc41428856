"""Personalization methods behind one API (docs/method.md, "Personalization" and "Baselines").

    result = personalize("fedp2eft", base_model, task, train_examples, budget=8, artifact=psg)
    metrics = task.evaluate(result.model, test_examples)

Each method lives in its own module and is declared by a :class:`MethodSpec`; ``METHODS`` lists them. Adding a
method = one new module + one entry below. Pass a :class:`ClientContext` instead of (base_model, task,
train_examples, artifact) to share a client's features, generator output and BayesTune searches between runs."""

from __future__ import annotations

import torch
from torch import nn

from fedp2eft.core.budget import check_budget
from fedp2eft.core.methods import adalora, btlora, fedl2p, fedp2eft, flexlora, hetlora, lora, nested_lora
from fedp2eft.core.personalization import LORA_SCALING, ClientContext, PersonalizeConfig, Personalized, RunPlan, \
    features_for, finetune_selection, frozen_copy, generator_spec, new_btlora, runs_per_pass, train_btlora, \
    train_plans
from fedp2eft.core.methods.registry import MethodSpec, Stage
from fedp2eft.core.tasks import Task
from fedp2eft.errors import FedP2EFTError

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    lora.METHOD, adalora.METHOD, btlora.METHOD, fedl2p.METHOD, fedp2eft.STRUCTURE, fedp2eft.METHOD,
    nested_lora.METHOD, hetlora.METHOD, flexlora.METHOD,
)}
STAGES: dict[str, Stage] = {spec.stage.name: spec.stage for spec in METHODS.values() if spec.stage is not None}


def method_spec(method: str) -> MethodSpec:
    """The declaration of ``method``; an unknown name is an error that lists the known ones."""
    if method not in METHODS:
        raise FedP2EFTError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")
    return METHODS[method]


def stages(methods: list[str]) -> list[Stage]:
    """The federated stages ``methods`` need, each once, in the order the methods name them."""
    found: dict[str, Stage] = {}
    for method in methods:
        stage = method_spec(method).stage
        if stage is not None:
            found.setdefault(stage.name, stage)
    return list(found.values())


def stage_named(name: str) -> Stage:
    """The federated stage called ``name`` that some method declares."""
    if name not in STAGES:
        raise FedP2EFTError(f"no method declares a federated stage '{name}'; known stages: {', '.join(STAGES)}")
    return STAGES[name]


def method_lr(config: PersonalizeConfig, method: str, budget: int | None = None) -> float | None:
    """The learning rate of ``method``'s LoRA weights (the config field its declaration names; for ``lora_lr`` at
    ``budget``, the rate its fine-tuning runs at, ``finetune_lr``); None for a method that learns its own."""
    field = method_spec(method).lr_field
    if field is None:
        return None
    return config.finetune_lr(budget) if field == "lora_lr" and budget is not None else getattr(config, field)


def personalize(method: str, base_model: nn.Module | ClientContext, task: Task | None = None,
                train_examples: list[dict] | None = None, budget: int = 8, config: PersonalizeConfig | None = None,
                artifact: object | None = None) -> Personalized:
    """Personalize a copy of ``base_model`` on one client's training examples under rank budget ``budget``.
    ``artifact`` is what the method's federated stage produced (a PS generator for fedp2eft)."""
    config = config or PersonalizeConfig()
    spec = method_spec(method)
    check_budget(budget, config.max_rank)
    if isinstance(base_model, ClientContext):
        context = base_model
    else:
        artifacts = {spec.stage.name: artifact} if spec.stage is not None and artifact is not None else {}
        context = ClientContext(base_model, task, train_examples, artifacts)
    torch.manual_seed(config.seed)
    return spec.personalize(context, budget, config)


def personalize_many(context: ClientContext, cells: list[tuple[str, int, PersonalizeConfig]]) -> list[Personalized]:
    """``personalize`` for every (method, budget, config) cell of one client, the LoRA-shaped ones (a ``plan``)
    trained together: one pass over the base model per step for each group of runs that share a seed, epochs and
    batch size, as many runs per pass as ``runs_per_pass`` allows. Each result equals the cell's ``personalize`` to
    float rounding; results come back in the order of ``cells``."""
    for method, budget, config in cells:
        check_budget(budget, config.max_rank)
    for method in dict.fromkeys(method for method, _, _ in cells):
        spec = method_spec(method)
        if spec.prepare is not None:
            spec.prepare(context, [config for name, _, config in cells if name == method])
    results: list[Personalized | None] = [None] * len(cells)
    groups: dict[tuple, list[tuple[int, RunPlan]]] = {}
    for index, (method, budget, config) in enumerate(cells):
        spec = method_spec(method)
        if spec.plan is None:
            results[index] = personalize(method, context, budget=budget, config=config)
            continue
        plan = spec.plan(context, budget, config)
        groups.setdefault((plan.run.seed, plan.epochs, plan.batch_size), []).append((index, plan))
    for (_, _, batch_size), planned in groups.items():
        size = runs_per_pass(context, batch_size)
        for start in range(0, len(planned), size):
            chunk = planned[start : start + size]
            for (index, _), result in zip(chunk, train_plans(context, [plan for _, plan in chunk])):
                results[index] = result
    return results


def evaluate_many(task: Task, results: list[Personalized], examples: list[dict]) -> list[dict]:
    """``task.evaluate`` of every result: the runs of one multi-run model in one pass over ``examples`` (their
    generations, if scored, decoded together too)."""
    scores: list[dict | None] = [None] * len(results)
    shared: dict[int, list[int]] = {}
    for index, result in enumerate(results):
        if result.run is None:
            scores[index] = task.evaluate(result.model, examples)
        else:
            shared.setdefault(id(result.model), []).append(index)
    for indices in shared.values():
        every_run = task.evaluate_runs(results[indices[0]].model, examples)
        for index in indices:
            scores[index] = every_run[results[index].run]
    return scores


__all__ = ["LORA_SCALING", "METHODS", "STAGES", "ClientContext", "MethodSpec", "PersonalizeConfig", "Personalized",
           "Stage", "features_for", "finetune_selection", "frozen_copy", "generator_spec", "method_lr", "method_spec",
           "evaluate_many", "new_btlora", "personalize", "personalize_many", "stage_named", "stages", "train_btlora"]
