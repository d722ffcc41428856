"""FedL2P's meta-net (Lee et al., NeurIPS 2023; docs/method.md, "Baselines"): it maps a client's meta-features
(the same features the PS generator reads) to one learning-rate multiplier per LoRA tensor, for ordinary
uniform-rank-r LoRA fine-tuning; and that fine-tuning, the method's personalization. How the meta-net is trained
lives in ``meta_training.py``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from fedp2eft.core.artifacts import ArtifactKind, load_artifact, save_artifact
from fedp2eft.core.btlora import clamp_ste
from fedp2eft.core.device import model_device
from fedp2eft.core.generator import FeatureLayout
from fedp2eft.core.personalization import ClientContext, PersonalizeConfig, Personalized, RunPlan, generator_spec, \
    lora_plan, personal_lora, train_metrics
from fedp2eft.core.tasks import Task
from fedp2eft.core.training import TrainResult, train
from fedp2eft.errors import FedP2EFTError

STAGE_NAME = "fedl2p"
ARTIFACT = ArtifactKind("fedp2eft_fedl2p", "FedL2P meta-net",
                        f"`fedp2eft benchmark` trains one (its stage `{STAGE_NAME}`)")
HIDDEN = 100  # FedL2P's meta-net: two hidden layers of 100 units
MULTIPLIER_MAX = 1000.0


def metanet_file(directory: str | Path, budget: int) -> Path:
    """Where ``FedL2PTask.export`` puts the meta-net of rank budget ``budget``."""
    return Path(directory) / f"fedl2p-r{budget}.safetensors"


# --- what a meta-net is tied to ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaNetSpec(FeatureLayout):
    """One base model, one LoRA module list, one rank budget r and one feature layout. Outputs are ordered module by
    module (``module_names`` order), A then B: output 2m scales module m's A, output 2m+1 its B."""

    base_model: str
    module_names: tuple[str, ...]
    budget: int
    feature_layers: tuple[str, ...]

    @property
    def num_outputs(self) -> int:
        return 2 * len(self.module_names)

    def mismatch(self, other: MetaNetSpec) -> str | None:
        """A sentence saying how ``other`` differs from this spec, or None when they agree."""
        if self.budget != other.budget:
            return f"budget r differs ({self.budget} vs {other.budget})"
        return self.layout_mismatch(other)


def metanet_spec(base_model: nn.Module, config: PersonalizeConfig, base_model_name: str, budget: int) -> MetaNetSpec:
    """The layout a meta-net for this base model, config and budget must have: the PS generator's modules and
    feature layers (``generator_spec``), so both read the same client features."""
    if not isinstance(budget, int) or budget <= 0:
        raise FedP2EFTError(f"FedL2P rank budget r={budget!r} must be a positive integer (the LoRA rank per module)")
    layout = generator_spec(base_model, config, base_model_name)
    return MetaNetSpec(base_model_name, layout.module_names, budget, layout.feature_layers)


# --- the meta-net --------------------------------------------------------------------------------------------------


class LRMetaNet(nn.Module):
    """MLP D -> 100 -> 100 -> 2M (ReLU between) whose outputs, clamped to [0, 1000] with a straight-through gradient,
    multiply ``base_lrs``, one learnable learning rate per LoRA tensor (FedL2P's learnable base learning rates).

    The last layer starts with tiny weights (Xavier gain ``init_gain``) and bias 1, so every multiplier starts
    within 1 ± 0.05 for features up to a norm of about 5000, i.e. FedL2P starts as plain LoRA at ``base_lr``;
    the hidden layers keep PyTorch's default init so that gradients reach them once the last layer has moved."""

    def __init__(self, spec: MetaNetSpec, base_lr: float = 1e-4, init_gain: float = 1e-4) -> None:
        super().__init__()
        self.spec = spec
        self.net = nn.Sequential(
            nn.Linear(spec.num_inputs, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, spec.num_outputs),
        )
        nn.init.xavier_uniform_(self.net[-1].weight, gain=init_gain)
        nn.init.constant_(self.net[-1].bias, 1.0)
        self.base_lrs = nn.Parameter(torch.full((spec.num_outputs,), float(base_lr)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The learning-rate multipliers, one per LoRA tensor (see ``MetaNetSpec`` for the order)."""
        return clamp_ste(self.net(features), 0.0, MULTIPLIER_MAX)

    def learning_rates(self, features: torch.Tensor) -> torch.Tensor:
        """The effective learning rate of every LoRA tensor: multiplier x base learning rate."""
        return self(features) * self.base_lrs

    def net_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def save(self, path: str | Path) -> None:
        """Safetensors weights with the spec as a JSON header, written atomically (``core/artifacts.py``)."""
        save_artifact(path, self.state_dict(), ARTIFACT, asdict(self.spec))

    @classmethod
    def load(cls, path: str | Path, expected: MetaNetSpec | None = None) -> LRMetaNet:
        """Load a saved meta-net; refuse one trained for another model layout or another budget."""
        raw, state = load_artifact(path, ARTIFACT)
        spec = MetaNetSpec(base_model=raw["base_model"], module_names=tuple(raw["module_names"]),
                           budget=int(raw["budget"]), feature_layers=tuple(raw["feature_layers"]))
        if expected is not None and (reason := spec.mismatch(expected)):
            raise FedP2EFTError(
                f"the FedL2P meta-net {path} was trained for base model '{spec.base_model}' at budget r={spec.budget} "
                f"and does not fit ({reason}); use the meta-net trained for this model and budget, or train one: "
                f"{ARTIFACT.how_to_get}"
            )
        metanet = cls(spec)
        metanet.load_state_dict(state)
        return metanet


def load_metanets(directory: str | Path, base_model: nn.Module, config: PersonalizeConfig,
                  base_model_name: str) -> dict[int, LRMetaNet]:
    """Every meta-net exported to ``directory`` (``metanet_file``), by budget, each checked against this model
    and config; a directory without any is an error that says how to get them."""
    directory = Path(directory)
    files = sorted(directory.glob("fedl2p-r*.safetensors")) if directory.is_dir() else []
    budgets = sorted(int(path.stem.removeprefix("fedl2p-r")) for path in files
                     if path.stem.removeprefix("fedl2p-r").isdigit())
    if not budgets:
        raise FedP2EFTError(f"no FedL2P meta-nets (fedl2p-r<budget>.safetensors) in {directory}; "
                            f"{ARTIFACT.how_to_get}")
    return {budget: LRMetaNet.load(metanet_file(directory, budget),
                                   expected=metanet_spec(base_model, config, base_model_name, budget))
            for budget in budgets}


# --- LoRA with per-tensor learning rates ---------------------------------------------------------------------------


def new_lora(base_model: nn.Module, spec: MetaNetSpec, seed: int) -> PeftModel:
    """A fresh rank-r LoRA on every module of ``spec`` (alpha = 2r, ``LORA_SCALING``), its init drawn from ``seed``."""
    return personal_lora(base_model, {name: spec.budget for name in spec.module_names}, seed)


def lora_tensors(model: PeftModel, module_names: Sequence[str], adapter: str = "default") -> list[nn.Parameter]:
    """The LoRA weight matrices in the meta-net's output order: for each module, its A then its B."""
    modules = dict(model.get_base_model().named_modules())
    tensors = []
    for name in module_names:
        layer = modules.get(name)
        if layer is None or adapter not in getattr(layer, "lora_A", {}):
            raise FedP2EFTError(f"module '{name}' carries no LoRA adapter '{adapter}'; build the model with new_lora")
        tensors += [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
    return tensors


def finetune_with_rates(model: PeftModel, tensors: list[nn.Parameter], rates: torch.Tensor, task: Task,
                        examples: list[dict], config: PersonalizeConfig) -> TrainResult:
    """Ordinary LoRA fine-tuning where tensor i learns at ``rates[i]``: AdamW with one parameter group per tensor,
    weight decay 0, the project's one training loop."""
    if len(tensors) != rates.numel():
        raise FedP2EFTError(f"{rates.numel()} learning rates for {len(tensors)} LoRA tensors")
    groups = [{"params": [tensor], "lr": rate} for tensor, rate in zip(tensors, rates.detach().cpu().tolist())]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    return train(model, task, examples, optimizer, config.epochs, config.batch_size, seed=config.seed)


# --- personalization -----------------------------------------------------------------------------------------------


def client_rates(context: ClientContext, budget: int, config: PersonalizeConfig,
                 metanet: LRMetaNet) -> tuple[MetaNetSpec, torch.Tensor, dict[str, float]]:
    """The meta-net's layout for this base model and budget (a mismatch is an error), the client's per-tensor
    learning rates (for each module, A's then B's), and what they say: their mean and the smallest and largest
    multiplier the meta-net gave (all 1: FedL2P personalizes as LoRA at its base rates)."""
    expected = metanet_spec(context.base_model, config, metanet.spec.base_model, budget)
    if reason := metanet.spec.mismatch(expected):
        raise FedP2EFTError(f"the FedL2P meta-net does not fit this base model and budget ({reason}); use the "
                            f"meta-net trained for this model, target modules and budget")
    with torch.no_grad():
        multipliers = metanet(context.features(expected).to(model_device(metanet)))
        rates = multipliers * metanet.base_lrs
    return expected, rates, {"mean_lr": float(rates.mean()), "multiplier_min": float(multipliers.min()),
                             "multiplier_max": float(multipliers.max())}


def plan_fedl2p(context: ClientContext, budget: int, config: PersonalizeConfig, metanet: LRMetaNet) -> RunPlan:
    """``personalize_fedl2p`` as a plan: the uniform-rank LoRA with one learning rate per tensor."""
    expected, rates, described = client_rates(context, budget, config, metanet)
    values = rates.detach().cpu().tolist()
    plan = lora_plan({name: budget for name in expected.module_names}, config, budget)  # its rates: tensor_lrs
    plan.run.tensor_lrs = {name: (values[2 * i], values[2 * i + 1]) for i, name in enumerate(expected.module_names)}
    plan.metrics.update(described)
    return plan


def personalize_fedl2p(context: ClientContext, budget: int, config: PersonalizeConfig,
                       metanet: LRMetaNet) -> Personalized:
    """FedL2P's personalization: the client's features -> per-tensor learning rates from the meta-net of this
    budget -> a fresh rank-r LoRA (alpha = 2r) fine-tuned with them for ``config.epochs``."""
    expected, rates, described = client_rates(context, budget, config, metanet)
    model = new_lora(context.base_model, expected, config.seed)
    result = finetune_with_rates(model, lora_tensors(model, expected.module_names), rates, context.task,
                                 context.examples, config)
    return Personalized(model, {name: budget for name in expected.module_names},
                        {**train_metrics(result, model), **described})
