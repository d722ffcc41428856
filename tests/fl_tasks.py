"""Test-only tasks: the toy task with scripted client faults (raise, NaN, wrong shape, ...).

Lives in tests/ (on sys.path under pytest; Ray workers inherit the driver's sys.path, and the
deployment test exports it as PYTHONPATH for SuperNodes) so that src/ carries no fault hooks.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fedp2eft.core.federation import ClientUpdate
from fedp2eft.fl.toy_task import ToyTask, make_task as make_toy_task

FAULTS = ("raise", "nan", "shape", "missing", "sleep")


class FaultyTask:
    """Delegates to ToyTask; client c misbehaves as ``faults[str(c)] = "kind@first_round"``."""

    def __init__(self, toy: ToyTask, faults: dict[str, str], sleep_s: float) -> None:
        self.toy = toy
        self.faults = faults
        self.sleep_s = sleep_s

    def initial_weights(self) -> dict[str, torch.Tensor]:
        return self.toy.initial_weights()

    def num_clients(self) -> int:
        return self.toy.num_clients()

    def client_update(self, weights: dict[str, torch.Tensor], client_index: int, server_round: int) -> ClientUpdate:
        kind, _, first = self.faults.get(str(client_index), "none@1").partition("@")
        update = self.toy.client_update(weights, client_index, server_round)
        if server_round < int(first or 1) or kind == "none":
            return update
        name = sorted(update.weights)[0]
        if kind == "raise":
            raise RuntimeError(f"scripted failure of client {client_index}")
        if kind == "nan":
            update.weights[name] = torch.full_like(update.weights[name], float("nan"))
        elif kind == "shape":
            update.weights[name] = torch.zeros(3, 3, 3)
        elif kind == "missing":
            del update.weights[name]
        elif kind == "sleep":
            time.sleep(self.sleep_s)
        return update


def make_task(config: dict[str, Any]) -> FaultyTask:
    config = dict(config)
    faults = config.pop("faults", {})
    sleep_s = float(config.pop("sleep_s", 30.0))
    unknown = {v.partition("@")[0] for v in faults.values()} - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {unknown}")
    return FaultyTask(make_toy_task(config), faults, sleep_s)


def make_tiny_psg_task(config: dict[str, Any]) -> Any:
    """The real PS-generator task on the tiny random BERT of conftest, for Flower runs."""
    from conftest import LABELS, bert_config, classification_examples, make_tokenizer
    from fedp2eft.core.generator_training import GeneratorTask, GeneratorTrainingConfig
    from fedp2eft.core.methods import PersonalizeConfig
    from fedp2eft.core.modeling import classifier_from_config
    from fedp2eft.core.tasks import ClassificationTask
    from fedp2eft.data.types import ClientData

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = classifier_from_config(bert_config(len(tokenizer)), LABELS)
    clients = [ClientData(f"c{i}", "xx", classification_examples(24, seed=10 + i),
                          classification_examples(4, seed=20 + i)) for i in range(int(config.get("num_clients", 3)))]
    personalize = PersonalizeConfig(max_rank=4, batch_size=8, lora_lr=1e-2, scale_lr=5e-2)
    training = GeneratorTrainingConfig(personalize=personalize, local_epochs=1, regression_steps=5, regression_lr=1e-2,
                                       standardize_features=bool(config.get("standardize_features", False)))
    return GeneratorTask(model, ClassificationTask(tokenizer, LABELS, max_length=32), clients, training, "tiny")
