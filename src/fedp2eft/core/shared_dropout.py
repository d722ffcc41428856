"""Dropout for K copies of one batch (``core/multi_lora.py``): every dropout draws one run's mask and shares it among
the copies, so each run sees the masks a separate run with the same seed draws, and batched training equals separate
runs with dropout on too."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn.functional import dropout
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


class TiledDropout(nn.Module):
    """Dropout that draws one mask for the rows of one run and applies it to every run's copy of the batch: each
    run sees the mask a separate run would draw, from the same random stream."""

    def __init__(self, p: float, runs: int) -> None:
        super().__init__()
        self.p, self.runs = p, runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        mask = dropout(torch.ones_like(x[: len(x) // self.runs]), self.p, True)
        return x * mask.repeat(self.runs, *[1] * (x.dim() - 1))


def tiled_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, *,
                    runs: int, **kwargs) -> tuple[torch.Tensor, None]:
    """Transformers' attention for K copies of a batch whose probability dropout draws one mask for one run's rows
    and shares it (what ``sdpa`` computes otherwise): a separate run draws that mask from the same stream."""
    if dropout == 0.0 or not module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = query @ key.transpose(-2, -1) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        blocked = torch.finfo(scores.dtype).min
        scores = (scores.masked_fill(~attention_mask, blocked) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    mask = torch.nn.functional.dropout(torch.ones_like(probabilities[: len(probabilities) // runs]), dropout, True)
    output = (probabilities * mask.repeat(runs, 1, 1, 1)) @ value
    return output.transpose(1, 2).contiguous(), None


def share_dropout_masks(model: nn.Module, runs: int) -> None:
    """Make every dropout of ``model`` (a copy that will see ``runs`` copies of each batch) draw one run's mask and
    share it: ``nn.Dropout`` modules become ``TiledDropout``, and attention-probability dropout goes through
    ``tiled_attention`` (registered with transformers' attention and mask interfaces under its own name)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Dropout):
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attribute, TiledDropout(module.p, runs))
    implementation = f"fedp2eft-tiled-{runs}"
    AttentionInterface.register(implementation, partial(tiled_attention, runs=runs))
    AttentionMaskInterface.register(implementation, sdpa_mask)
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) in ("sdpa", "eager"):
            config._attn_implementation = implementation
