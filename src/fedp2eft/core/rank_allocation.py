"""AdaLoRA's rank allocation for the AdaLoRA runs of a ``MultiLoRAModel`` (``core/multi_lora.py``), on its stacked
factors, so that AdaLoRA trains in the batched pass too."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedp2eft.errors import FedP2EFTError

if TYPE_CHECKING:
    from fedp2eft.core.multi_lora import MultiLoRAModel


class RankAllocation:
    """AdaLoRA's rank allocation (PEFT's ``RankAllocator`` and ``AdaLoraModel.update_and_allocate``, Zhang et al.,
    ICLR 2023) for the AdaLoRA runs of a ``MultiLoRAModel``, on the stacked factors: after every optimizer step, each
    run's sensitivity |p * grad| of A, E and B is smoothed (EMA beta1) with its uncertainty (EMA beta2); on its
    schedule (no pruning for ``tinit`` steps, a cubic fall from the initial to the target budget, the final
    ``tfinal`` steps at the target) each run zeroes the singular values whose triplet score, E's plus the mean of
    A's row and B's column, lies at or below the k-th smallest of that run's scores; after the final allocation its
    pattern is applied again after every step. Tested against PEFT's own on both tiny models."""

    def __init__(self, model: MultiLoRAModel) -> None:
        self.model = model
        self.rows = [index for index, run in enumerate(model.runs) if run.adalora is not None]
        configs = [model.runs[index].adalora for index in self.rows]
        if len({(c.beta1, c.beta2) for c in configs}) > 1:
            raise FedP2EFTError("AdaLoRA runs trained in one pass must share beta1 and beta2; train them apart")
        self.beta1, self.beta2 = configs[0].beta1, configs[0].beta2
        device = next(iter(model.layers.values())).a_all.device
        self.index = torch.tensor(self.rows, device=device)
        self.weights = torch.zeros(model.run_count, device=device)
        self.weights[self.index] = torch.tensor([c.orth_reg_weight for c in configs], device=device)
        self.restart()

    def restart(self) -> None:
        """A fresh training: step 0, no smoothed scores, no final pattern."""
        self.steps = 0
        self.smoothed: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.patterns: dict[int, dict[str, torch.Tensor]] = {}

    def orthogonality_penalty(self) -> torch.Tensor:
        """Per run (K): orth_reg_weight times the mean over its A and B matrices of ||P P^T - I||_F (0 for a run
        that is not AdaLoRA), which PEFT's AdaLoraModel adds to the loss of every forward pass; added in training
        only, so that an evaluation's loss is the task's, as a PEFT model scores it."""
        layers = list(self.model.layers.values())
        total = sum(layer.orthogonality(self.index) for layer in layers)
        counts = sum((layer.gate_mask[self.index] > 0).any(1).to(total.dtype) * 2 for layer in layers)
        penalty = torch.zeros_like(self.weights).index_copy(0, self.index, total / counts)
        return self.weights * penalty

    def _scores(self) -> dict[str, torch.Tensor]:
        """Each layer's triplet scores, (AdaLoRA runs) x rank."""
        scores = {}
        for name, terms in self.smoothed.items():
            (a_ipt, a_unc), (b_ipt, b_unc), (e_ipt, e_unc) = terms
            scores[name] = e_ipt * e_unc + ((a_ipt * a_unc).mean(2) + (b_ipt * b_unc).mean(1))
        return scores

    def _smooth(self) -> None:
        for name, layer in self.model.layers.items():
            tensors = (layer.a_all, layer.b_all, layer.scale_all)
            sensitivities = [(t.detach()[self.index] * t.grad[self.index]).abs() for t in tensors]
            if name not in self.smoothed:
                self.smoothed[name] = [(torch.zeros_like(s), torch.zeros_like(s)) for s in sensitivities]
            updated = []
            for (ipt, unc), sensitivity in zip(self.smoothed[name], sensitivities):
                ipt = self.beta1 * ipt + (1 - self.beta1) * sensitivity
                updated.append((ipt, self.beta2 * unc + (1 - self.beta2) * (sensitivity - ipt).abs()))
            self.smoothed[name] = updated

    def _mask(self, slot: int, pattern: dict[str, torch.Tensor]) -> None:
        run = self.rows[slot]
        with torch.no_grad():
            for name, keep in pattern.items():
                layer = self.model.layers[name]
                layer.scale_all[run, : len(keep)].masked_fill_(~keep, 0.0)

    def _allocate(self, slot: int, budget: int, initial: int, every_score: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
        run = self.rows[slot]
        scores = {name: score[slot, : self.model.layers[name].widths[run]] for name, score in every_score.items()
                  if self.model.layers[name].widths[run]}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=initial - budget)[0].item()
        pattern = {name: score > threshold for name, score in scores.items()}
        self._mask(slot, pattern)
        return pattern

    def step(self) -> None:
        """What PEFT's ``update_and_allocate(global_step)`` does after optimizer step ``global_step``, for every
        AdaLoRA run."""
        step, self.steps = self.steps, self.steps + 1
        configs = [self.model.runs[run].adalora for run in self.rows]
        if any(step < c.total_step - c.tfinal for c in configs):
            self._smooth()
        scores: dict[str, torch.Tensor] = {}
        for slot, (run, config) in enumerate(zip(self.rows, configs)):
            final = config.total_step - config.tfinal
            if step > final:
                self._mask(slot, self.patterns[slot])
                continue
            widths = [layer.widths[run] for layer in self.model.layers.values() if layer.widths[run]]
            initial, target = sum(widths), config.target_r * len(widths)
            if step <= config.tinit:
                budget, masks = initial, False
            else:
                remaining = 1 - (step - config.tinit) / (final - config.tinit)
                budget = int((initial - target) * remaining**3 + target)
                masks = step % config.deltaT == 0
            if step == final or masks:
                scores = scores or self._scores()
                pattern = self._allocate(slot, budget, initial, scores)
                if step == final:
                    self.patterns[slot] = pattern
