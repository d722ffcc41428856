"""FlexLoRA (Bai et al., NeurIPS 2024; docs/method.md, "Budget-heterogeneous peers"), engine-free: clients of different
budgets train LoRA at their own rank r_i; the server averages their full-size updates dW = sum_i p_i B_i A_i (p_i by
example count) and hands client i the rank-r_i truncated SVD of dW (B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T) as its
next start, so every client gets the best rank-r_i summary of what all clients learnt.

The server keeps the top R components of dW's SVD in the usual factor layout: a client's rank-r_i truncation of
those equals the truncation of dW itself for every r_i <= R, so nothing a client could receive is lost. Where this
differs from the paper: a component whose singular value is (numerically) zero would have zero A and B, which get
no gradient; it keeps its A from the previous global factors (PEFT's init before any update) and gets a zero B, so
the product is unchanged and a client can still train it."""

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


def svd_of_sum(terms: list[tuple[float, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """U (out x k), S (k), V^T (k x in) of dW = sum_i w_i B_i A_i, k = sum_i r_i, without forming dW: dW is
    B_cat A_cat with B_cat = [sqrt(w_i) B_i] and A_cat = [sqrt(w_i) A_i], so with B_cat = Q_b R_b and
    A_cat^T = Q_a R_a the SVD of the small R_b R_a^T gives dW's (in float64; a module costs O((out + in) k^2)
    instead of a full SVD of out x in)."""
    b_cat = torch.cat([w ** 0.5 * b.double() for w, _, b in terms], dim=1)
    a_cat = torch.cat([w ** 0.5 * a.double() for w, a, _ in terms], dim=0)
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u, s, vh @ q_a.T


def svd_factors(terms: list[tuple[float, torch.Tensor, torch.Tensor]], previous_a: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the global rank R = ``previous_a``'s: B A is the best rank-R approximation of
    dW = sum_i w_i B_i A_i, with B = U sqrt(S) and A = sqrt(S) V^T. A component with no singular value (fewer than R
    ranks trained) or a negligible one keeps ``previous_a``'s row as its A and gets a zero B (module docstring)."""
    u, s, vh = svd_of_sum(terms)
    rank = previous_a.shape[0]
    keep = min(rank, s.numel())
    live = s[:keep] > NEGLIGIBLE * float(s[0]) if float(s[0]) > 0 else torch.zeros(keep, dtype=torch.bool)
    live = torch.cat([live, torch.zeros(rank - keep, dtype=torch.bool)])
    root = torch.zeros(rank, dtype=torch.float64)
    root[:keep] = s[:keep].sqrt()
    a = previous_a.double().clone()
    b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
    a[:keep][live[:keep]] = (root[:keep, None] * vh[:keep])[live[:keep]]
    b[:, :keep][:, live[:keep]] = (u[:, :keep] * root[:keep])[:, live[:keep]]
    return a.to(previous_a.dtype), b.to(previous_a.dtype)


def svd_redistribution(global_factors: Factors, replies: list[tuple[Factors, int]]) -> Factors:
    """FlexLoRA's server step for each module: dW = sum_i (n_i / N) B_i A_i over the replies (factors, example
    count), kept as the top-R components of its SVD, R the global factors' rank."""
    total = sum(count for _, count in replies)
    return {name: svd_factors([(count / total, *factors[name]) for factors, count in replies], global_a)
            for name, (global_a, _) in global_factors.items()}


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
