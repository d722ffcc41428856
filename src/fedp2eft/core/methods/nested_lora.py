"""Nested-rank LoRA, a budget-heterogeneous peer (docs/method.md, "Nested-rank LoRA"): a rank-R LoRA trained
federatedly with a random rank per local step, cut at the client's budget r (its first r components) and
fine-tuned there like uniform LoRA. The mathematics and the federated job live in ``core/nested_lora.py``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fedp2eft.core.methods.prefix import prefix_method
from fedp2eft.core.methods.registry import Stage
from fedp2eft.core.nested_lora import ARTIFACT
from fedp2eft.core.nested_lora import STAGE_NAME, NestedLoRAConfig, NestedLoRATask
from fedp2eft.core.personalization import PersonalizeConfig
from fedp2eft.core.prefix_lora import Factors
from fedp2eft.core.tasks import Task
from fedp2eft.data.types import ClientData


def build_task(base_model: nn.Module, task: Task, clients: list[ClientData], training: dict, base_model_name: str,
               budgets: list[int]) -> NestedLoRATask:
    """One adapter of rank R serves every budget (``budgets`` is not needed)."""
    return NestedLoRATask(base_model, task, clients, NestedLoRAConfig.from_dict(training), base_model_name)


def load(path: Path, base_model: nn.Module, config: PersonalizeConfig, base_model_name: str) -> Factors:
    return ARTIFACT.load(path, base_model, config)


STAGE = Stage(
    name=STAGE_NAME, title="the nested-rank LoRA (rank R, cut at each budget)", build=build_task,
    config_class=NestedLoRAConfig, load=load,
    # its local training runs at the rate validation chose for uniform LoRA
    defaults={"rounds": 20, "clients_per_round": 4, "lr_scale": "lora", "training": {}},
    how_to_get="let `fedp2eft benchmark` train it (stage `nested`) or point --artifact at its nested_lora.safetensors",
)

METHOD = prefix_method("nested-lora", STAGE)
