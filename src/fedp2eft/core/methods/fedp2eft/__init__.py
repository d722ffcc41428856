"""FedP²EFT: the federatedly trained PS generator maps the client's features to Lambda; the global top-(r*M)
entries give the ranks, their values the fixed multipliers of a fresh LoRA (docs/method.md, "Personalization").
``fedp2eft-structure`` keeps the generator's ranks with every multiplier 1: its structure without its magnitude
(the reference code's switch; docs/method.md, "Structure and magnitude")."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedp2eft.core.budget import Selection, select_top_ranks
from fedp2eft.core.device import model_device
from fedp2eft.core.generator import PSGenerator
from fedp2eft.core.generator_training import GeneratorTask, GeneratorTrainingConfig
from fedp2eft.core.personalization import ClientContext, PersonalizeConfig, Personalized, RunPlan, \
    finetune_selection, generator_spec, selection_plan
from fedp2eft.core.methods.registry import MethodSpec, Stage
from fedp2eft.core.tasks import Task
from fedp2eft.data.types import ClientData
from fedp2eft.errors import FedP2EFTError


def build_generator_task(base_model: nn.Module, task: Task, clients: list[ClientData], training: dict,
                         base_model_name: str, budgets: list[int]) -> GeneratorTask:
    """One generator serves every budget (``budgets`` is not needed: budget sampling, if on, draws its own)."""
    return GeneratorTask(base_model, task, clients, GeneratorTrainingConfig.from_dict(training), base_model_name)


def load_generator(path: Path, base_model: nn.Module, config: PersonalizeConfig, base_model_name: str) -> PSGenerator:
    return PSGenerator.load(path, expected=generator_spec(base_model, config, base_model_name))


def generator_max_rank(path: Path) -> int:
    return PSGenerator.load(path).spec.rank


PSG_STAGE = Stage(
    name="psg", title="the PS generator", build=build_generator_task, config_class=GeneratorTrainingConfig, load=load_generator,
    defaults={"rounds": 20, "clients_per_round": 4, "training": {}},
    how_to_get="train one with `fedp2eft train-psg` (or let `fedp2eft benchmark` train it)",
    max_rank=generator_max_rank,
)


def generator_selection(context: ClientContext, budget: int, config: PersonalizeConfig) -> Selection:
    """Lambda = PSG(x) for this client (computed once per client), then the global top-(r*M) ranks."""
    generator = context.artifacts.get(PSG_STAGE.name)
    if generator is None:
        raise FedP2EFTError(f"method 'fedp2eft' needs a trained PS generator: {PSG_STAGE.how_to_get}")
    expected = generator_spec(context.base_model, config, generator.spec.base_model)
    if reason := generator.spec.mismatch(expected):
        raise FedP2EFTError(f"the PS generator does not fit this base model ({reason}); use the generator "
                            f"trained for this model and target modules")

    def generate() -> torch.Tensor:  # on the generator's device (it may live on a GPU); Lambda comes back to the CPU
        with torch.no_grad():
            return generator(context.features(expected).to(model_device(generator))).cpu()

    scales = context.shared(("generated", id(generator)), generate)
    return select_top_ranks(scales, list(expected.module_names), config.max_rank, budget)


def personalize_fedp2eft(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    return finetune_selection(context, generator_selection(context, budget, config), config, budget)


def personalize_fedp2eft_structure(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    return finetune_selection(context, generator_selection(context, budget, config), config, budget,
                              unit_scales=True)


def plan_fedp2eft(context: ClientContext, budget: int, config: PersonalizeConfig) -> RunPlan:
    return selection_plan(generator_selection(context, budget, config), config, budget)


def plan_fedp2eft_structure(context: ClientContext, budget: int, config: PersonalizeConfig) -> RunPlan:
    return selection_plan(generator_selection(context, budget, config), config, budget, unit_scales=True)


METHOD = MethodSpec("fedp2eft", personalize_fedp2eft, reports=("ranks", "lambdas", "tie_order"), stage=PSG_STAGE,
                    plan=plan_fedp2eft)
STRUCTURE = MethodSpec("fedp2eft-structure", personalize_fedp2eft_structure, reports=("ranks",), stage=PSG_STAGE,
                       plan=plan_fedp2eft_structure, ablation_of="fedp2eft")
