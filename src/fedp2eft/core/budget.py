"""Budget selection (docs/method.md): keep the global top k = r*M entries of Lambda, r being the average rank per
module."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedp2eft.errors import FedP2EFTError


def check_budget(budget: int, max_rank: int) -> None:
    if not isinstance(budget, int) or budget <= 0 or budget > max_rank:
        raise FedP2EFTError(
            f"rank budget r={budget!r} is out of range: it must be an integer with 1 <= r <= R={max_rank} "
            "(r is the average LoRA rank per module)"
        )


@dataclass
class Selection:
    """The kept ranks: per module, the indices of its kept ranks and their lambda values (fixed multipliers)."""

    kept: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]

    @property
    def ranks(self) -> dict[str, int]:
        return {name: len(index) for name, index in self.kept.items()}

    @property
    def total(self) -> int:
        return sum(self.ranks.values())


def top_entries_mask(scales: torch.Tensor, num_modules: int, budget: int) -> torch.Tensor:
    """Boolean mask of the global top ``budget * num_modules`` entries of a flat Lambda."""
    mask = torch.zeros_like(scales, dtype=torch.bool)
    mask[torch.topk(scales, budget * num_modules).indices] = True
    return mask


def select_top_ranks(scales: torch.Tensor, module_names: list[str], max_rank: int, budget: int) -> Selection:
    """Global top-(budget * M) of the flat Lambda; modules that keep no rank are left out (no LoRA)."""
    check_budget(budget, max_rank)
    expected = len(module_names) * max_rank
    if scales.numel() != expected:
        raise FedP2EFTError(f"Lambda has {scales.numel()} entries; M*R = {len(module_names)}*{max_rank} = {expected}")
    flat = scales.detach().flatten().float()
    per_module = top_entries_mask(flat, len(module_names), budget).view(len(module_names), max_rank)
    values = flat.view(len(module_names), max_rank)
    kept, kept_values = {}, {}
    for row, name in enumerate(module_names):
        index = per_module[row].nonzero().flatten()
        if len(index):
            kept[name] = index
            kept_values[name] = values[row, index].clone()
    return Selection(kept=kept, values=kept_values)
