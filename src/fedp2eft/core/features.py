"""Client meta-features (docs/method.md, "Client features"): mean and standard deviation of the input of every
hooked base linear layer, pooled over the client's whole training set with LoRA switched off and padding tokens
left out."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack, nullcontext

import torch
from peft import PeftModel
from torch import nn

from fedp2eft.core.device import model_device, to_device


def feature_layer_names(model: nn.Module, target_modules: list[str]) -> list[str]:
    """The layers that carry LoRA plus the LM head (the output embedding), when the model has one."""
    names = list(target_modules)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Linear):
        head_name = next(name for name, module in model.named_modules() if module is head)
        if head_name not in names:
            names.append(head_name)
    return names


class RunningMoments:
    """Count, mean and sum of squared deviations, merged batch by batch with the parallel formula of Chan et al.
    In float64, so the result does not depend on how the data were batched (beyond rounding)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, values: torch.Tensor) -> None:
        values = values.detach().double()
        count = values.numel()
        if count == 0:
            return
        mean = values.mean().item()
        m2 = ((values - mean) ** 2).sum().item()
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count else 0.0


class FeatureCollector:
    """Forward pre-hooks on named linear layers that accumulate the moments of their inputs.

    ``token_mask`` (batch, seq) marks real tokens; inputs shaped (batch, seq, dim) keep only those rows.
    """

    def __init__(self, model: nn.Module, layer_names: list[str]) -> None:
        modules = dict(model.named_modules())
        self.layer_names = layer_names
        self.moments = {name: RunningMoments() for name in layer_names}
        self.token_mask: torch.Tensor | None = None
        self._stack = ExitStack()
        for name in layer_names:
            handle = modules[name].register_forward_pre_hook(self._hook(name))
            self._stack.callback(handle.remove)

    def _hook(self, name: str):
        def hook(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            mask = self.token_mask
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask.bool()]
            self.moments[name].add(x)

        return hook

    def vector(self) -> torch.Tensor:
        """x = [mu_1, sd_1, mu_2, sd_2, ...] in layer order."""
        values = []
        for name in self.layer_names:
            values += [self.moments[name].mean, self.moments[name].std]
        return torch.tensor(values, dtype=torch.float32)

    def close(self) -> None:
        self._stack.close()


def client_features(model: nn.Module, batches: Iterable[dict], layer_names: list[str]) -> torch.Tensor:
    """Run the base model over ``batches`` and return the feature vector (on the CPU).

    ``batches`` are dicts of model inputs with an ``attention_mask``; build them with the task's
    ``feature_collate`` so that only the inputs (for instruction data: the prompt, never the response) shape the
    features. A ``labels`` entry is dropped. Batches go to the model's device; the forward pass stays in float32
    (no autocast) and runs in inference mode. ``layer_names`` are names in ``model``; a PEFT model is run with
    its adapters disabled."""
    device = model_device(model)
    hooked = model.get_base_model() if isinstance(model, PeftModel) else model
    collector = FeatureCollector(hooked, layer_names)
    disabled = model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()
    was_training = model.training
    model.eval()
    try:
        with disabled, torch.inference_mode():
            for batch in batches:
                inputs = to_device({key: value for key, value in batch.items() if key != "labels"}, device)
                collector.token_mask = inputs.get("attention_mask")
                model(**inputs)
    finally:
        collector.close()
        model.train(was_training)
    return collector.vector()
