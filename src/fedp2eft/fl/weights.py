"""Tensor plumbing between ``FederatedTask`` weights and Flower records, plus the checks of client updates.

The server must never trust a client reply: every update is checked against the global
weights (same keys, shapes, dtypes, finite values) before it may enter the average.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

Weights = dict[str, torch.Tensor]


def to_record(weights: Weights) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict({k: v.detach().cpu().contiguous() for k, v in weights.items()})


def from_record(record: ArrayRecord) -> Weights:
    return dict(record.to_torch_state_dict())


def update_problem(reference: Weights, update: Weights) -> str | None:
    """Why ``update`` cannot be averaged into ``reference`` (None when it can)."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"weight keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, ref in reference.items():
        got = update[name]
        if got.shape != ref.shape:
            return f"tensor {name!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"tensor {name!r} has dtype {got.dtype}, expected {ref.dtype}"
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            return f"tensor {name!r} holds NaN or Inf"
    return None


def update_norm(reference: Weights, update: Weights) -> float:
    """The L2 norm of ``update - reference`` over the floating-point tensors: the size DP's clipping norm is
    compared with, so a non-private run's norms say where to clip (docs/federation.md, "Differential privacy")."""
    total = sum(float((update[name].double() - ref.double()).pow(2).sum())
                for name, ref in reference.items() if ref.is_floating_point())
    return total ** 0.5
