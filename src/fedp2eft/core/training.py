"""The one training loop every method and every federated client uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fedp2eft.core.device import autocast_for, model_device, to_device
from fedp2eft.core.tasks import Task, iterate_batches, length_groups


@dataclass
class TrainResult:
    """Per-step losses (task loss, without priors) and per-epoch means; for a model that trains several runs at
    once (``core/multi_lora.py``) each entry is a list with one loss per run, and ``run(k)`` is run k's result."""

    step_losses: list = field(default_factory=list)
    epoch_losses: list = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.step_losses)

    def run(self, index: int) -> TrainResult:
        return TrainResult([step[index] for step in self.step_losses], [epoch[index] for epoch in self.epoch_losses])


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


def train(
    model: nn.Module,
    task: Task,
    examples: list[dict],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Minimise ``output.loss (+ extra_loss())`` for ``epochs`` passes over shuffled ``examples``.

    ``after_step(global_step)`` runs after ``optimizer.step()`` and before gradients are cleared (AdaLoRA's
    rank allocation reads them there).

    A batch runs as length groups whose gradients add up to the batch's (``tasks.length_groups``; on the CPU this
    skips most padding). Batches go to the model's device (that of its first parameter); the forward passes and the
    extra loss run under bf16 autocast when the task's ``precision`` is bf16, else in plain float32.
    A model whose loss is a vector (one per run of a ``MultiLoRAModel``) is trained on the sum, whose gradient for
    each run's disjoint parameters is that run's own."""
    result = TrainResult()
    device = model_device(model)
    model.train()
    step = 0
    for epoch in range(epochs):
        epoch_losses = []
        for batch in iterate_batches(examples, task.collate, batch_size, shuffle_seed=seed * 1000 + epoch):
            loss = 0.0
            for part, share in length_groups(batch, task.loss_units, device):
                with autocast_for(device, task.precision):
                    part_loss = model(**to_device(part, device)).loss * share
                part_loss.sum().backward()
                loss = loss + part_loss.detach()
            if extra_loss is not None:
                with autocast_for(device, task.precision):
                    prior = extra_loss()
                prior.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            optimizer.zero_grad(set_to_none=True)
            epoch_losses.append(loss.tolist())  # a float, or one per run
            step += 1
        result.step_losses += epoch_losses
        result.epoch_losses.append(_mean(epoch_losses))
    model.eval()
    return result


def _mean(losses: list) -> float | list[float]:
    """The mean of per-step losses: floats, or per-run lists averaged run by run."""
    if isinstance(losses[0], list):
        return [sum(run) / len(run) for run in zip(*losses)]
    return sum(losses) / len(losses)
