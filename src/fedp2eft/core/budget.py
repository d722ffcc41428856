"""Budget selection (docs/method.md): keep the global top k = r*M entries of Lambda, r being the average rank per
module."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedp2eft.errors import FedP2EFTError

TIE_TOLERANCE = 1e-5  # relative: an entry this close to the cut's value is equal to it (docs/discussion.md, ties)


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
    tie_order: int = 0  # kept entries equal to one left out: chosen by torch.topk's tie order, not by Lambda

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


def chosen_by_tie_order(flat: torch.Tensor, mask: torch.Tensor) -> int:
    """How many kept entries tie with an entry the cut left out (within ``TIE_TOLERANCE`` of the cut's value):
    which of them were kept is the sort's tie order, so a map made of them says nothing about the generator."""
    kept, left = flat[mask], flat[~mask]
    if not len(kept) or not len(left):
        return 0
    cut = float(kept.min())
    tolerance = TIE_TOLERANCE * abs(cut)
    if float(left.max()) < cut - tolerance:
        return 0
    return int(((kept - cut).abs() <= tolerance).sum())


def select_top_ranks(scales: torch.Tensor, module_names: list[str], max_rank: int, budget: int) -> Selection:
    """Global top-(budget * M) of the flat Lambda; modules that keep no rank are left out (no LoRA)."""
    check_budget(budget, max_rank)
    expected = len(module_names) * max_rank
    if scales.numel() != expected:
        raise FedP2EFTError(f"Lambda has {scales.numel()} entries; M*R = {len(module_names)}*{max_rank} = {expected}")
    flat = scales.detach().flatten().float()
    mask = top_entries_mask(flat, len(module_names), budget)
    per_module = mask.view(len(module_names), max_rank)
    values = flat.view(len(module_names), max_rank)
    kept, kept_values = {}, {}
    for row, name in enumerate(module_names):
        index = per_module[row].nonzero().flatten()
        if len(index):
            kept[name] = index
            kept_values[name] = values[row, index].clone()
    return Selection(kept=kept, values=kept_values, tie_order=chosen_by_tie_order(flat, mask))
