"""Nested-rank LoRA, a budget-heterogeneous peer (docs/method.md, "Budget-heterogeneous peers"): a rank-R LoRA trained
federatedly with a random rank per local step, cut at the client's budget r (its first r components) and
fine-tuned there like uniform LoRA. The mathematics and the federated job live in ``task.py``."""

from fedp2eft.core.methods.prefix import peer_stage, prefix_method
from fedp2eft.core.methods.nested_lora.task import ARTIFACT, STAGE_NAME, NestedLoRATask
from fedp2eft.core.prefix_lora import PeerConfig

STAGE = peer_stage(STAGE_NAME, "the nested-rank LoRA (rank R, cut at each budget)",
                   # one adapter of rank R serves every budget: the run's budgets are not needed
                   lambda base, task, clients, config, name, budgets: NestedLoRATask(base, task, clients, config, name),
                   PeerConfig, ARTIFACT)
METHOD = prefix_method("nested-lora", STAGE)
