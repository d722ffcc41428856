"""HetLoRA, a budget-heterogeneous peer (docs/method.md, "Budget-heterogeneous peers"): seen clients train at their own
budgets with rank self-pruning, the server zero-pads and averages by update size; a client of budget r
personalizes from the first r components, like uniform LoRA. The mathematics and the federated job live in
``task.py``."""

from fedp2eft.core.methods.hetlora.task import ARTIFACT, STAGE_NAME, HetLoRAConfig, HetLoRATask
from fedp2eft.core.methods.prefix import peer_stage, prefix_method

STAGE = peer_stage(STAGE_NAME, "HetLoRA (each seen client at its own budget, rank R on the server)", HetLoRATask,
                   HetLoRAConfig, ARTIFACT)
METHOD = prefix_method("hetlora", STAGE)
