"""FlexLoRA (Bai et al., NeurIPS 2024; docs/method.md, "Budget-heterogeneous peers"), engine-free: clients of different
budgets train LoRA at their own rank r_i; the server averages their full-size updates dW = sum_i p_i B_i A_i (p_i by
example count) and hands client i the rank-r_i truncated SVD of dW (B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T) as its
next start, so every client gets the best rank-r_i summary of what all clients learnt.

The server keeps the top R components of dW's SVD in the usual factor layout: a client's rank-r_i truncation of
those equals the truncation of dW itself for every r_i <= R, so nothing a client could receive is lost. Where this
differs from the paper: a component whose singular value is (numerically) zero would have zero A and B, which get
no gradient; its A is the SVD's right singular vector scaled to the norm of a row of PEFT's init and its B at zero,
so the product is unchanged and a client can still train it."""

from __future__ import annotations

import torch

from fedp2eft.core.artifacts import ArtifactKind
from fedp2eft.core.federation import ClientUpdate, Reply
from fedp2eft.core.prefix_lora import Factors, FactorsArtifact, HeterogeneousRankTask, from_weights, to_weights

STAGE_NAME = "flexlora"
ARTIFACT = FactorsArtifact("flexlora.safetensors", ArtifactKind(
    "fedp2eft_flexlora", "FlexLoRA adapter",
    "let `fedp2eft benchmark` train one (stage `flexlora`) or point --artifact at its file"))

# A singular value below this share of the largest is zero to float32 rounding of a product of factors.
NEGLIGIBLE = 1e-6
# PEFT draws A from kaiming_uniform(a=sqrt(5)): entries uniform in +-1/sqrt(in), so a row's norm is about sqrt(1/3).
PEFT_ROW_NORM = 3 ** -0.5


def svd_factors(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: rank x in, B: out x rank) with B A the best rank-``rank`` approximation of ``update`` (out x in),
    B = U sqrt(S), A = sqrt(S) V^T; components with a negligible singular value get a unit-direction A at PEFT's
    init scale and a zero B (see the module's docstring)."""
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    a, b = root[:, None] * vh[:keep], u[:, :keep] * root
    dead = s[:keep] <= NEGLIGIBLE * float(s[0]) if float(s[0]) > 0 else torch.ones(keep, dtype=torch.bool)
    a[dead] = vh[:keep][dead] * PEFT_ROW_NORM
    b[:, dead] = 0.0
    if keep < rank:  # fewer singular values than R (a module narrower than R): zero B, no product
        a = torch.cat([a, torch.zeros(rank - keep, update.shape[1], dtype=a.dtype)])
        b = torch.cat([b, torch.zeros(update.shape[0], rank - keep, dtype=b.dtype)], dim=1)
    return a.to(update.dtype), b.to(update.dtype)


def svd_redistribution(global_factors: Factors, replies: list[tuple[Factors, int]]) -> Factors:
    """FlexLoRA's server step for each module: dW = sum_i (n_i / N) B_i A_i over the replies (factors, example
    count), kept as the top-R components of its SVD, R the global factors' rank."""
    total = sum(count for _, count in replies)
    combined = {}
    for name, (global_a, _) in global_factors.items():
        update = sum((count / total) * (factors[name][1].double() @ factors[name][0].double())
                     for factors, count in replies)
        combined[name] = svd_factors(update.to(global_a.dtype), global_a.shape[0])
    return combined


class FlexLoRATask(HeterogeneousRankTask):
    """FlexLoRA's federated job; implements ``FederatedTask``, ``ExportableTask`` and ``AggregatingTask``."""

    artifact = ARTIFACT

    def client_update(self, weights: dict[str, torch.Tensor], client_index: int, server_round: int) -> ClientUpdate:
        trained, result = self.train_from(from_weights(weights), client_index, server_round)
        return self.update(trained, result, client_index)

    def aggregate(self, weights: dict[str, torch.Tensor], replies: list[Reply],
                  server_round: int) -> dict[str, torch.Tensor]:
        return to_weights(svd_redistribution(from_weights(weights),
                                             [(from_weights(r.weights), r.num_examples) for r in replies]))
