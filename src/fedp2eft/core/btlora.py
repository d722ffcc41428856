"""BT-LoRA: PEFT LoRA with a per-rank scale vector lambda between A and B (docs/method.md, "BT-LoRA").

    y = W0 x + scaling * B diag(lambda * mask) A x

PEFT is used as is: lambda enters through a forward hook on each ``lora_A`` sub-module (a public torch
mechanism), so no PEFT class is forked or patched. A module's scales are clamped to [1e-4, 1000] with a
straight-through gradient; a rank whose mask is 0 is switched off (contributes exactly nothing).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from fedp2eft.errors import FedP2EFTError

LORA_SCALING = 2.0  # alpha = 2 * rank, as in the paper
SCALE_MIN = 1e-4
SCALE_MAX = 1000.0


def clamp_ste(values: torch.Tensor, low: float = SCALE_MIN, high: float = SCALE_MAX) -> torch.Tensor:
    """Clamp in the forward pass, identity in the backward pass (so clamped scales can still recover)."""
    return values + (values.clamp(low, high) - values).detach()


@dataclass
class PriorConfig:
    """BayesTune priors; paper values by default. Both terms are divided by the client's dataset size N."""

    significance_weight: float = 100.0  # a_s: Laplace prior on the change of each column of B
    sparsity_weight: float = 0.01  # a_p: Gamma hyper-prior on lambda
    gamma_rate: float = 100.0


def default_target_modules(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` inside the transformer block stack (the longest ``nn.ModuleList``)."""
    blocks = max(
        (module for module in model.modules() if isinstance(module, nn.ModuleList)), key=len, default=None
    )
    if blocks is None:
        raise FedP2EFTError("the model has no nn.ModuleList of transformer blocks; pass target_modules explicitly")
    block_ids = {id(module) for module in blocks.modules() if isinstance(module, nn.Linear)}
    return [name for name, module in model.named_modules() if id(module) in block_ids]


def resolve_target_modules(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Full names of the linear layers to adapt: all block linears, or those whose name matches a pattern
    (a regex matched against the end of the module name, as PEFT does)."""
    if patterns is None:
        return default_target_modules(model)
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen = [name for name in linear_names if any(re.fullmatch(rf"(.*\.)?({p})", name) for p in patterns)]
    if not chosen:
        sample = ", ".join(linear_names[:6])
        raise FedP2EFTError(
            f"target modules {patterns} match no linear layer of the model; linear layers look like: {sample}"
        )
    return chosen


def attach_lora(model: nn.Module, ranks: dict[str, int], scaling: float, seed: int = 0,
                carry: Sequence[str] = ()) -> PeftModel:
    """Wrap ``model`` with a PEFT LoRA whose module ``name`` has rank ``ranks[name]`` and scaling ``scaling``.

    Heterogeneous ranks use PEFT's own ``rank_pattern``/``alpha_pattern`` (alpha = scaling * rank), so the
    result saves and loads as a standard PEFT adapter. The LoRA init is drawn from ``seed`` so that every
    fresh LoRA of a client starts from the same weights. The modules named in ``carry`` (a classifier's head)
    are saved with the adapter, frozen (``carry_frozen``).
    """
    if not ranks:
        raise FedP2EFTError("no module was given a LoRA rank; check target_modules and the budget")
    names = list(ranks)
    first = ranks[names[0]]
    config = LoraConfig(
        r=first,
        lora_alpha=scaling * first,
        lora_dropout=0.0,
        target_modules=names,
        rank_pattern={re.escape(name): rank for name, rank in ranks.items()},
        alpha_pattern={re.escape(name): scaling * rank for name, rank in ranks.items()},
        modules_to_save=list(carry) or None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return carry_frozen(get_peft_model(model, config))


def attach_adalora(model: nn.Module, config: AdaLoraConfig, seed: int = 0) -> PeftModel:
    """Wrap ``model`` with PEFT's AdaLoRA of ``config``, its init drawn from ``seed`` (as ``attach_lora``), the
    modules it carries frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return carry_frozen(get_peft_model(model, config))


def carry_frozen(model: PeftModel) -> PeftModel:
    """Freeze the copies PEFT made of the ``modules_to_save`` (it makes them trainable): personalization trains
    the LoRA only and leaves the base model's head as it is (docs/method.md, "The classification head"); the adapter
    carries the head so that it reproduces its predictions on the plain encoder."""
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.modules_to_save.requires_grad_(False)
    return model


class RankGate(nn.Module):
    """Per-rank scales of one LoRA module, plus the column snapshot B0 used by the significance prior."""

    def __init__(self, rank: int, init: torch.Tensor | float, trainable: bool) -> None:
        super().__init__()
        values = torch.full((rank,), float(init)) if not torch.is_tensor(init) else init.detach().clone().float()
        self.scale = nn.Parameter(values, requires_grad=trainable)
        self.register_buffer("mask", torch.ones(rank))

    def effective(self) -> torch.Tensor:
        return clamp_ste(self.scale) * self.mask


class BTLoRAModel(nn.Module):
    """A PEFT LoRA model whose every LoRA module carries a :class:`RankGate`.

    ``ranks`` maps module name -> rank; ``init_scales`` gives each module's starting lambda (a float for all,
    or a dict of tensors); ``carry`` names modules saved with the adapter, frozen (``attach_lora``). Module
    order (``module_names``) is the model's own order, and the flat scale vector Lambda is the concatenation of
    the modules' scales in that order.
    """

    def __init__(
        self,
        model: nn.Module,
        ranks: dict[str, int],
        scaling: float,
        init_scales: float | dict[str, torch.Tensor] = SCALE_MIN,
        trainable_scales: bool = True,
        priors: PriorConfig | None = None,
        adapter_name: str = "default",
        lora_seed: int = 0,
        carry: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.peft_model = attach_lora(model, ranks, scaling, seed=lora_seed, carry=carry)
        self.priors = priors or PriorConfig()
        self.adapter_name = adapter_name
        self.lora_layers: dict[str, LoraLayer] = {}
        for name, module in self.peft_model.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                self.lora_layers[name] = module
        self.module_names = list(self.lora_layers)
        self.gates = nn.ModuleDict()
        for name in self.module_names:
            init = init_scales if isinstance(init_scales, float) else init_scales[name]
            gate = RankGate(ranks[name], init, trainable_scales).to(self.lora_b(name).device)
            self.gates[self._key(name)] = gate
            self.lora_layers[name].lora_A[adapter_name].register_forward_hook(self._gate_hook(gate))
        self.snapshot_b()

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    @staticmethod
    def _gate_hook(gate: RankGate):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output * gate.effective()

        return hook

    def gate(self, name: str) -> RankGate:
        return self.gates[self._key(name)]

    def lora_b(self, name: str) -> nn.Parameter:
        return self.lora_layers[name].lora_B[self.adapter_name].weight

    def snapshot_b(self) -> None:
        """Record B0 = the current B (the Laplace prior penalises the change from here)."""
        self._b0 = {name: self.lora_b(name).detach().clone() for name in self.module_names}

    def forward(self, *args, **kwargs):
        return self.peft_model(*args, **kwargs)

    def scales(self) -> torch.Tensor:
        """Lambda: the clamped, masked scales of all modules, concatenated in module order."""
        return torch.cat([self.gate(name).effective() for name in self.module_names])

    def set_scales(self, values: torch.Tensor) -> None:
        """Load a flat Lambda. Entries equal to 0 switch their rank off (mask 0); others are the new scales."""
        offset = 0
        with torch.no_grad():
            for name in self.module_names:
                gate = self.gate(name)
                part = values[offset : offset + gate.scale.numel()].to(gate.scale)
                gate.scale.copy_(part.clamp(SCALE_MIN, SCALE_MAX))
                gate.mask.copy_((part > 0).float())
                offset += gate.scale.numel()
        if offset != values.numel():
            raise FedP2EFTError(f"Lambda has {values.numel()} entries but the model's LoRA holds {offset} ranks")

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Switch ranks on (1) or off (0) per module."""
        with torch.no_grad():
            for name, mask in masks.items():
                self.gate(name).mask.copy_(mask.float())

    def scale_parameters(self) -> list[nn.Parameter]:
        return [self.gate(name).scale for name in self.module_names]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.peft_model.named_parameters() if p.requires_grad and "lora_" in n]

    def prior_loss(self, num_examples: int) -> torch.Tensor:
        """(a_s/N) sum ||B[:,i]-B0[:,i]||_1 / lambda_i + (a_p/N) sum (log lambda_i + rate * lambda_i),
        over the ranks that are switched on."""
        if num_examples <= 0:
            raise FedP2EFTError("the prior needs the client's dataset size N > 0")
        significance = torch.zeros(())
        sparsity = torch.zeros(())
        for name in self.module_names:
            gate = self.gate(name)
            scales = clamp_ste(gate.scale)
            change = (self.lora_b(name) - self._b0[name]).abs().sum(dim=0)
            significance = significance + (gate.mask * change / scales).sum()
            sparsity = sparsity + (gate.mask * (scales.log() + self.priors.gamma_rate * scales)).sum()
        return (
            self.priors.significance_weight * significance + self.priors.sparsity_weight * sparsity
        ) / num_examples

    def fold_scales(self) -> PeftModel:
        """Fold lambda into B (B <- B diag(lambda * mask)), set every scale to 1, and return the PEFT model:
        it now computes the same function without the gates and saves as a standard PEFT adapter."""
        with torch.no_grad():
            for name in self.module_names:
                gate = self.gate(name)
                self.lora_b(name).mul_(gate.effective())
                gate.scale.fill_(1.0)
                gate.mask.fill_(1.0)
        return self.peft_model
