"""BT-LoRA: BayesTune run locally on the client alone, then top-(r*M) rank selection and fine-tuning
(docs/method.md, "Baselines")."""

from __future__ import annotations

from dataclasses import asdict

import torch

from fedp2eft.core.budget import select_top_ranks
from fedp2eft.core.methods.registry import MethodSpec
from fedp2eft.core.personalization import ClientContext, PersonalizeConfig, Personalized, finetune_selection, \
    new_btlora, train_btlora


def bayestune_scales(context: ClientContext, config: PersonalizeConfig) -> tuple[torch.Tensor, list[str], float]:
    """Lambda learned by local BayesTune from lambda = 1e-4, and the search's last-epoch task loss; one search
    per search setting (the config without the fine-tuning epochs), shared by every budget. The search draws its
    random numbers (dropout) from a forked generator seeded by ``config.seed``, so a budget's fine-tuning starts
    from the same random state whether the search ran just before it or was shared from an earlier budget: a
    cell's result does not depend on which budgets were computed before it (``fedp2eft personalize --run``
    rebuilds any one cell alone)."""
    setting = repr(sorted((key, value) for key, value in asdict(config).items() if key != "epochs"))

    def search() -> tuple[torch.Tensor, list[str], float]:
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            model = new_btlora(context.base_model, config)
            result = train_btlora(model, context.task, context.examples, config, config.bayestune_epochs)
        return model.scales().detach(), model.module_names, result.epoch_losses[-1]

    return context.shared(("bayestune", setting), search)


def personalize_btlora(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    scales, module_names, search_loss = bayestune_scales(context, config)
    result = finetune_selection(context, select_top_ranks(scales, module_names, config.max_rank, budget), config)
    result.metrics["search_loss_last_epoch"] = search_loss
    return result


METHOD = MethodSpec("btlora", personalize_btlora, reports=("ranks",))
