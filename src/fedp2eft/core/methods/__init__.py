"""Personalization methods behind one API (docs/method.md, "Personalization" and "Baselines").

    result = personalize("fedp2eft", base_model, task, train_examples, budget=8, artifact=psg)
    metrics = task.evaluate(result.model, test_examples)

Each method lives in its own folder and is declared by a :class:`MethodSpec`; ``METHODS`` lists them. Adding a
method = one new folder + one entry below, or, from another package, one ``fedp2eft.methods`` entry point naming
its ``MethodSpec`` (docs/architecture.md). Pass a :class:`ClientContext` instead of (base_model, task,
train_examples, artifact) to share a client's features, generator output and BayesTune searches between runs."""

from __future__ import annotations

from dataclasses import asdict, fields
from importlib.metadata import entry_points

import torch
from torch import nn

from fedp2eft.core.budget import check_budget
from fedp2eft.core.methods import adalora, btlora, fedl2p, fedp2eft, flexlora, hetlora, lora, nested_lora
from fedp2eft.core.personalization import LORA_SCALING, ClientContext, PersonalizeConfig, Personalized, RunPlan, \
    features_for, finetune_selection, frozen_copy, generator_spec, new_btlora, runs_per_pass, train_btlora, \
    train_plans
from fedp2eft.core.methods.registry import MethodSpec, Stage, grid_point_folder, grid_point_folders
from fedp2eft.core.tasks import Task
from fedp2eft.errors import FedP2EFTError

METHOD_GROUP = "fedp2eft.methods"  # another package's methods: `name = "module:METHOD"` in its pyproject


def plugin_methods() -> list[MethodSpec]:
    """The methods other installed packages declare through the ``fedp2eft.methods`` entry point."""
    found = []
    for entry in entry_points(group=METHOD_GROUP):
        spec = entry.load()
        if not isinstance(spec, MethodSpec):
            raise FedP2EFTError(f"the {METHOD_GROUP} entry point '{entry.name}' ({entry.value}) gives a "
                                f"{type(spec).__name__}, not a MethodSpec")
        found.append(spec)
    return found


def by_name(specs: list[MethodSpec]) -> dict[str, MethodSpec]:
    """Methods by name; two methods of one name, or a setting two of them (or a method and the shared settings)
    would both read from the ``personalize:`` section, are errors."""
    methods: dict[str, MethodSpec] = {}
    owners = dict.fromkeys(PersonalizeConfig.shared_keys(), "every method")
    for spec in specs:
        if spec.name in methods:
            raise FedP2EFTError(f"two methods are called '{spec.name}'; rename one")
        methods[spec.name] = spec
        for item in fields(spec.settings) if spec.settings is not None else ():
            if item.name in owners:
                raise FedP2EFTError(f"method '{spec.name}' declares the setting personalize.{item.name}, which "
                                    f"{owners[item.name]} already reads; give it a name of its own")
            owners[item.name] = f"method '{spec.name}'"
    return methods


METHODS: dict[str, MethodSpec] = by_name([
    lora.METHOD, adalora.METHOD, btlora.METHOD, fedl2p.METHOD, fedp2eft.STRUCTURE, fedp2eft.METHOD,
    nested_lora.METHOD, hetlora.METHOD, flexlora.METHOD, *plugin_methods(),
])
STAGES: dict[str, Stage] = {spec.stage.name: spec.stage for spec in METHODS.values() if spec.stage is not None}
OWN_SETTINGS: dict[str, type] = {name: spec.settings for name, spec in METHODS.items() if spec.settings is not None}


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


def personalize_config(raw: dict) -> PersonalizeConfig:
    """The ``personalize:`` section read with every method's own settings (``MethodSpec.settings``)."""
    return PersonalizeConfig.from_dict(raw, OWN_SETTINGS)


def settings_for_stage(raw: dict, stage: Stage, lr_scale: float) -> dict:
    """The ``personalize`` mapping that ``stage``'s local training gets: the shared settings as configured and the
    own settings of the methods that use the stage, every learning rate times ``lr_scale``."""
    config = personalize_config(raw).with_lr_scale(lr_scale)
    mapping = {key: value for key, value in raw.items() if key in PersonalizeConfig.shared_keys()}
    mapping |= {item.name: getattr(config, item.name) for item in fields(config) if item.metadata.get("learning_rate")}
    for name, spec in METHODS.items():
        if spec.stage is stage and spec.settings is not None:
            mapping |= asdict(config.settings(name, spec.settings))
    return mapping


def method_lr(config: PersonalizeConfig, method: str, budget: int | None = None) -> float | None:
    """The learning rate of ``method``'s LoRA weights (the setting its declaration names; for ``lora_lr`` at
    ``budget``, the rate its fine-tuning runs at, ``finetune_lr``); None for a method that learns its own."""
    spec = method_spec(method)
    field = spec.lr_field
    if field is None:
        return None
    if spec.settings is not None and field in {item.name for item in fields(spec.settings)}:
        return getattr(config.settings(method, spec.settings), field)
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


__all__ = ["LORA_SCALING", "METHODS", "OWN_SETTINGS", "STAGES", "ClientContext", "MethodSpec", "PersonalizeConfig",
           "Personalized", "Stage", "features_for", "finetune_selection", "frozen_copy", "generator_spec",
           "grid_point_folder", "grid_point_folders", "method_lr",
           "method_spec", "evaluate_many", "new_btlora", "personalize", "personalize_config", "personalize_many",
           "settings_for_stage", "stage_named", "stages", "train_btlora"]
