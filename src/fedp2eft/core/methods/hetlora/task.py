"""HetLoRA (Cho et al., EMNLP 2024; docs/method.md, "Budget-heterogeneous peers"), engine-free: the server keeps a rank-R
LoRA; a client of budget r trains its first r components with a penalty on the norm of its trailing components
and self-prunes the trailing components that end up carrying little of its update; the server zero-pads every
reply back to R and averages them with weights proportional to the size of each client's update (sparsity-
weighted aggregation), so a client whose update is small counts less.

Where this differs from the paper: a pruned component is sent as zeros for that round rather than removed from
the client's later rounds (the client trains at its budget every time it is sampled, as every method here does);
and a component that no reply of the round covers (every sampled client's budget is smaller) keeps its global
value instead of becoming zero, since zero A and B get no gradient and the component would be lost for good."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedp2eft.core.artifacts import ArtifactKind
from fedp2eft.core.federation import ClientUpdate, Reply
from fedp2eft.core.prefix_lora import Factors, FactorsArtifact, HeterogeneousRankTask, PeerConfig, from_weights, \
    to_weights

STAGE_NAME = "hetlora"
ARTIFACT = FactorsArtifact("hetlora.safetensors", ArtifactKind(
    "fedp2eft_hetlora", "HetLoRA adapter",
    "let `fedp2eft benchmark` train one (stage `hetlora`) or point --artifact at its file"))


@dataclass
class HetLoRAConfig(PeerConfig):
    """Local self-pruning: the trailing ``tail_fraction`` of a client's r components (at least one, none at r = 1)
    are penalized by ``tail_penalty`` x ||B_tail|| ||A_tail|| per module and zeroed after training when their share
    of the module's update ||B_tail A_tail|| / ||B A|| is below ``prune_threshold``."""

    tail_penalty: float = 0.01
    tail_fraction: float = 0.25
    prune_threshold: float = 0.05


def tail_size(rank: int, fraction: float) -> int:
    """How many trailing components of a rank-``rank`` LoRA the penalty and the pruning look at."""
    return 0 if rank <= 1 else min(rank - 1, max(1, math.floor(fraction * rank)))


def tail_norms(factors: Factors, fraction: float) -> torch.Tensor:
    """Sum over modules of ||B_tail||_F ||A_tail||_F: HetLoRA's penalty on the trailing components (of factors of
    rank 2 or more)."""
    return torch.stack([b[:, -t:].norm() * a[-t:].norm() for a, b in factors.values()
                        if (t := tail_size(a.shape[0], fraction))]).sum()


def self_prune(factors: Factors, fraction: float, threshold: float) -> tuple[Factors, int]:
    """Zero each module's trailing components whose share of its update ||B_tail A_tail||_F / ||B A||_F is below
    ``threshold``; the pruned factors and how many modules were pruned."""
    pruned, count = {}, 0
    for name, (a, b) in factors.items():
        t = tail_size(a.shape[0], fraction)
        whole = float((b @ a).norm())
        if t and whole > 0 and float((b[:, -t:] @ a[-t:]).norm()) < threshold * whole:
            a, b = a.clone(), b.clone()
            a[-t:], b[:, -t:] = 0.0, 0.0
            count += 1
        pruned[name] = (a, b)
    return pruned, count


def sparsity_weighted(global_factors: Factors, replies: list[Factors]) -> Factors:
    """HetLoRA's server step for each module: every reply's factors zero-padded to the global rank R, averaged with
    weights ||B_k A_k||_F / sum_j ||B_j A_j||_F (equal weights when every update is zero; example counts play no
    part, as in the paper). Components beyond every reply's rank keep their global value."""
    combined = {}
    for name, (global_a, global_b) in global_factors.items():
        sizes = torch.tensor([float((b @ a).norm()) for factors in replies for a, b in [factors[name]]])
        weights = sizes / sizes.sum() if sizes.sum() > 0 else torch.full_like(sizes, 1 / len(replies))
        a_sum, b_sum = torch.zeros_like(global_a), torch.zeros_like(global_b)
        for weight, factors in zip(weights.tolist(), replies):
            a, b = factors[name]
            a_sum[: a.shape[0]] += weight * a
            b_sum[:, : b.shape[1]] += weight * b
        covered = max(factors[name][0].shape[0] for factors in replies)
        a_sum[covered:], b_sum[:, covered:] = global_a[covered:], global_b[:, covered:]
        combined[name] = (a_sum, b_sum)
    return combined


class HetLoRATask(HeterogeneousRankTask):
    """HetLoRA's federated job; implements ``FederatedTask``, ``ExportableTask`` and ``AggregatingTask``."""

    artifact = ARTIFACT

    def client_update(self, weights: dict[str, torch.Tensor], client_index: int, server_round: int) -> ClientUpdate:
        config = self.config
        has_tail = tail_size(self.budgets[client_index], config.tail_fraction) > 0
        trained, result = self.train_from(
            from_weights(weights), client_index, server_round,
            penalty=(lambda live: config.tail_penalty * tail_norms(live, config.tail_fraction)) if has_tail else None)
        pruned, count = self_prune(trained, config.tail_fraction, config.prune_threshold)
        return self.update(pruned, result, client_index, pruned_modules=float(count))

    def aggregate(self, weights: dict[str, torch.Tensor], replies: list[Reply],
                  server_round: int) -> dict[str, torch.Tensor]:
        return to_weights(sparsity_weighted(from_weights(weights), [from_weights(r.weights) for r in replies]))
