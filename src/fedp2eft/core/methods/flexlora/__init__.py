"""FlexLoRA, a budget-heterogeneous peer (docs/method.md, "Budget-heterogeneous peers"): seen clients train at their own
budgets, the server averages their full-size updates and keeps the top R components of its SVD; a client of budget
r personalizes from the best rank-r summary of it, like uniform LoRA. The mathematics and the federated job live in
``task.py``."""

from fedp2eft.core.methods.flexlora.task import ARTIFACT, STAGE_NAME, FlexLoRATask
from fedp2eft.core.methods.prefix import peer_stage, prefix_method
from fedp2eft.core.prefix_lora import PeerConfig

STAGE = peer_stage(STAGE_NAME, "FlexLoRA (each seen client at its own budget, the SVD of the averaged update on the "
                   "server)", FlexLoRATask, PeerConfig, ARTIFACT)
METHOD = prefix_method("flexlora", STAGE)
