"""BT-LoRA: BayesTune run locally on the client alone, then top-(r*M) rank selection and fine-tuning
(docs/method.md, "Baselines")."""

from __future__ import annotations

from dataclasses import asdict

import torch

from fedp2eft.core.budget import select_top_ranks
from fedp2eft.core.methods.registry import MethodSpec
from fedp2eft.core.personalization import ClientContext, PersonalizeConfig, Personalized, RunPlan, \
    finetune_selection, new_btlora, search_plan, selection_plan, train_btlora, train_plans


def search_key(config: PersonalizeConfig) -> tuple:
    """One search per search setting (the config without the fine-tuning epochs and other methods' own settings),
    shared by every budget."""
    return ("bayestune", repr(sorted((key, value) for key, value in asdict(config).items()
                                     if key not in ("epochs", "rank_lr_exponent", "own", "own_lr_scale"))))


def bayestune_scales(context: ClientContext, config: PersonalizeConfig) -> tuple[torch.Tensor, list[str], float]:
    """Lambda learned by local BayesTune from lambda = 1e-4, and the search's last-epoch task loss. The search
    draws its random numbers (dropout) from a forked generator seeded by ``config.seed``, so a budget's fine-tuning
    starts from the same random state whether the search ran just before it or was shared from an earlier budget: a
    cell's result does not depend on which budgets were computed before it (``fedp2eft personalize --run``
    rebuilds any one cell alone)."""

    def search() -> tuple[torch.Tensor, list[str], float]:
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            model = new_btlora(context.base_model, config)
            result = train_btlora(model, context.task, context.examples, config, config.bayestune_epochs)
        return model.scales().detach(), model.module_names, result.epoch_losses[-1]

    return context.shared(search_key(config), search)


def prepare_searches(context: ClientContext, configs: list[PersonalizeConfig]) -> None:
    """The searches of ``configs`` not yet done, trained together (one pass per step for those sharing a seed,
    epochs and batch size) and kept where ``bayestune_scales`` finds them."""
    pending: dict[tuple, PersonalizeConfig] = {}
    for config in configs:
        if not context.has(search_key(config)):
            pending.setdefault(search_key(config), config)
    groups: dict[tuple, list[tuple[tuple, PersonalizeConfig]]] = {}
    for key, config in pending.items():
        groups.setdefault((config.seed, config.bayestune_epochs, config.batch_size), []).append((key, config))
    for members in groups.values():
        with torch.random.fork_rng():
            results = train_plans(context, [search_plan(context, config) for _, config in members])
        for (key, _), result in zip(members, results):
            model = result.model
            context.shared(key, lambda: (model.scales(result.run).detach(), list(model.layers),
                                         result.metrics["train_loss_last_epoch"]))


def personalize_btlora(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    scales, module_names, search_loss = bayestune_scales(context, config)
    result = finetune_selection(context, select_top_ranks(scales, module_names, config.max_rank, budget), config,
                                budget)
    result.metrics["search_loss_last_epoch"] = search_loss
    return result


def plan_btlora(context: ClientContext, budget: int, config: PersonalizeConfig) -> RunPlan:
    scales, module_names, search_loss = bayestune_scales(context, config)
    plan = selection_plan(select_top_ranks(scales, module_names, config.max_rank, budget), config, budget)
    plan.metrics["search_loss_last_epoch"] = search_loss
    return plan


METHOD = MethodSpec("btlora", personalize_btlora, reports=("ranks",), plan=plan_btlora, prepare=prepare_searches)
