"""FedL2P (Lee et al., NeurIPS 2023), the paper's strongest baseline: federatedly meta-learned per-tensor learning
rates for a uniform-rank LoRA (docs/method.md, "Baselines"). The meta-net and the personalization it drives live in
``metanet.py``, its federated training in ``meta_training.py``; this module declares the method and its stage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fedp2eft.core.methods.fedl2p.meta_training import FedL2PConfig, FedL2PTask
from fedp2eft.core.methods.fedl2p.metanet import STAGE_NAME, LRMetaNet, load_metanets, personalize_fedl2p, plan_fedl2p
from fedp2eft.core.methods.registry import MethodSpec, Stage, grid_point_folders
from fedp2eft.core.personalization import ClientContext, PersonalizeConfig, Personalized, RunPlan
from fedp2eft.core.tasks import Task
from fedp2eft.data.types import ClientData
from fedp2eft.errors import FedP2EFTError


def build_task(base_model: nn.Module, task: Task, clients: list[ClientData], training: dict, base_model_name: str,
               budgets: list[int]) -> FedL2PTask:
    """One meta-net per budget, all trained in one federated run (the paper trains one per budget)."""
    return FedL2PTask(base_model, task, clients, FedL2PConfig.from_dict(training), base_model_name, budgets)


@dataclass(frozen=True)
class MetaNetsPerPoint:
    """The meta-nets of a stage trained once per meta learning rate of the grid (``select_on_grid``): grid point ->
    budget -> meta-net."""

    points: dict[float, dict[int, LRMetaNet]]

    def at(self, scale: float) -> dict[int, LRMetaNet]:
        point = next((p for p in self.points if math.isclose(p, scale, rel_tol=1e-9)), None)
        if point is None:
            raise FedP2EFTError(f"the FedL2P meta-nets were trained at x{', x'.join(f'{p:g}' for p in self.points)} the "
                                f"configured meta learning rate, not at x{scale:g}; personalize at one of those "
                                "learning-rate scales or train meta-nets at this one")
        return self.points[point]


def load(path: Path, base_model: nn.Module, config: PersonalizeConfig, base_model_name: str
         ) -> dict[int, LRMetaNet] | MetaNetsPerPoint:
    """The meta-nets of a stage folder by budget; or, for a stage trained once per meta learning rate of the grid,
    those of every grid point."""
    points = grid_point_folders(path)
    if not points:
        return load_metanets(path, base_model, config, base_model_name)
    return MetaNetsPerPoint({point: load_metanets(folder, base_model, config, base_model_name)
                             for point, folder in points.items()})


STAGE = Stage(
    name=STAGE_NAME, title="FedL2P's meta-nets (one per rank in the task config's `budgets`)", build=build_task, config_class=FedL2PConfig, load=load,
    # its meta-nets' base learning rates start at the rate validation chose for uniform LoRA
    defaults={"rounds": 10, "clients_per_round": 4, "lr_scale": "lora", "training": {}},
    how_to_get="let `fedp2eft benchmark` train them (stage `fedl2p`) or point --artifact at their folder",
    # its meta learning rate can be chosen on validation rows like a method's learning rate (docs/method.md,
    # "Baselines"): one federated run per grid point
    grid_field="meta_lr",
)


def metanet_for(context: ClientContext, budget: int, config: PersonalizeConfig) -> LRMetaNet:
    """The meta-net of ``budget``; from a stage trained per grid point, the one of the point ``config``'s learning
    rates were scaled by (the meta learning rate selection chose for this budget, or the point being validated)."""
    metanets = context.artifacts.get(STAGE_NAME)
    if metanets is None:
        raise FedP2EFTError(f"method 'fedl2p' needs trained FedL2P meta-nets: {STAGE.how_to_get}")
    if isinstance(metanets, MetaNetsPerPoint):
        metanets = metanets.at(config.own_lr_scale)
    if budget not in metanets:
        raise FedP2EFTError(f"no FedL2P meta-net for budget r={budget} (there are meta-nets for r in "
                            f"{sorted(metanets)}); train them with this budget among the budgets")
    return metanets[budget]


REPORTS = ("mean_lr", "multiplier_min", "multiplier_max")  # what the meta-net made of the client's rates


def personalize(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    result = personalize_fedl2p(context, budget, config, metanet_for(context, budget, config))
    result.report.update({field: result.metrics[field] for field in REPORTS})
    return result


def plan(context: ClientContext, budget: int, config: PersonalizeConfig) -> RunPlan:
    planned = plan_fedl2p(context, budget, config, metanet_for(context, budget, config))
    planned.report.update({field: planned.metrics[field] for field in REPORTS})
    return planned


METHOD = MethodSpec("fedl2p", personalize, lr_field=None, reports=REPORTS, stage=STAGE, plan=plan)
