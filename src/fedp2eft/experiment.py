"""Glue from names to objects: a model name and a dataset name become a base model, a task and clients.
Shared by the federated tasks, the benchmark and the CLI, so every stage reads its inputs the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fedp2eft.core.device import resolve_device, resolve_precision
from fedp2eft.core.federation import FederatedTask
from fedp2eft.core.modeling import SequenceClassifier, load_causal_lm
from fedp2eft.core.tasks import ClassificationTask, InstructionTask, Task
from fedp2eft.data.registry import load_dataset
from fedp2eft.data.types import FederatedDataset
from fedp2eft.errors import FedP2EFTError, config_from_mapping
from fedp2eft.models.registry import resolve_model


def load_tokenizer(model_path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint, loaded once per process while its files stay the same: a load takes seconds
    (transformers parses the embedded e5's 17 MB tokenizer.json in Python: 3.5 s of a 3.8 s stage build, profiled),
    and one process builds setups of the same checkpoint several times (each federated stage on the server side,
    each worker's jobs). Nothing in the package changes a tokenizer once loaded, so one object serves them all."""
    files = tuple((path.name, path.stat().st_mtime_ns) for path in sorted(Path(model_path).glob("*.json")))
    return _load_tokenizer(Path(model_path), files)


@lru_cache(maxsize=4)
def _load_tokenizer(model_path: Path, files: tuple) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class Setup:
    """A base model checkpoint and a federated dataset, with the task that connects them."""

    model: str
    dataset: str
    dataset_options: dict
    max_length: int = 128
    generation_tokens: int = 0  # instruction tasks: greedy tokens per test example scored by ROUGE-L/exact match
    precision: str = "fp32"  # bf16 or fp32: how the task's forward passes compute (core/device.py)

    @cached_property
    def model_path(self) -> Path:
        return resolve_model(self.model)

    @cached_property
    def data(self) -> FederatedDataset:
        return load_dataset(self.dataset, **self.dataset_options)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.model_path)

    @cached_property
    def task(self) -> Task:
        if self.data.task == "classification":
            return ClassificationTask(self.tokenizer, self.data.labels, self.max_length, precision=self.precision)
        return InstructionTask(self.tokenizer, self.max_length, self.generation_tokens, precision=self.precision)

    def load_base_model(self, device: str | torch.device = "cpu", new_head_seed: int | None = None) -> nn.Module:
        """A fresh copy of the base model from disk, placed on ``device``: a torch device or a ``device:`` setting
        (``auto``, ``cpu``, ``cuda``, ``cuda:N``; see ``core/device.py``). The CPU by default. A classifier's head
        must have been saved for the dataset's labels; only the base stage, which trains the head, passes
        ``new_head_seed`` to start from a fresh head drawn from it when the checkpoint has none for these labels
        (docs/method.md, "The classification head")."""
        target = device if isinstance(device, torch.device) else resolve_device(device)
        if self.data.task == "classification":
            model = SequenceClassifier.from_pretrained(self.model_path, self.data.labels, new_head_seed)
        else:
            model = load_causal_lm(self.model_path)
        return model if target.type == "cpu" else model.to(target)

    @cached_property
    def pfl(self) -> dict | None:
        """What made the base model when it is a personalized-FL base (``core/pfl.py``), else None."""
        from fedp2eft.core.pfl import read_pfl_metadata

        return read_pfl_metadata(self.model_path)

    def personal_overlay(self, model: nn.Module, pool: str, index: int) -> dict[str, torch.Tensor] | None:
        """What turns ``model`` (this setup's base) into the personal base of client ``index`` of ``pool``: None
        for a plain base. A pFL base exists for seen clients only: the others have no state of their own."""
        from fedp2eft.core.pfl import personal_overlay

        if self.pfl is None:
            return None
        if pool != "seen":
            raise FedP2EFTError(
                f"the base model {self.model} was trained with {self.pfl['algorithm']}, whose personal bases exist "
                "for seen clients only (they hold the client's own state); choose a seen client")
        return personal_overlay(self.model_path, self.pfl, model, index, self.data.seen[index].client_id)

    @classmethod
    def from_config(cls, config: dict) -> Setup:
        """A setup from a JSON-able config; ``precision: auto`` is resolved for the config's ``device`` here, so a
        config that already names bf16 or fp32 (a benchmark resolves it once, in its main process) computes the
        same on every machine that runs it."""
        return cls(config["model"], config["dataset"], dict(config.get("dataset_options", {})),
                   int(config.get("max_length", 128)), int(config.get("generation_tokens", 0)),
                   resolve_precision(config.get("precision", "fp32"), str(config.get("device", "auto"))))


def make_base_task(config: dict) -> FederatedTask:
    """The base model's FedAvg job from a JSON-able config: {model, dataset, dataset_options, max_length,
    device, training: {...}} (the ``base`` task of the Flower apps). ``device`` (default ``auto``: a GPU when the
    client sees one) is where the client's model computes. A checkpoint without a head for the dataset's labels
    (e.g. the embedded e5) starts from a head drawn from the training seed, so every client builds the same."""
    from fedp2eft.core.base_training import BaseTrainingConfig
    from fedp2eft.core.pfl import base_model_task

    setup = Setup.from_config(config)
    training = config_from_mapping(BaseTrainingConfig, config.get("training", {}), "training")
    base = setup.load_base_model(config.get("device", "auto"), new_head_seed=training.seed)
    return base_model_task(base, setup.task, setup.data.seen, training)


def make_stage_task(stage: str, config: dict) -> FederatedTask:
    """The federated stage ``stage`` of a personalization method (``psg``, ...) from the same kind of config plus
    the rank ``budgets`` it serves, built by the stage's own declaration (``core/methods``)."""
    from fedp2eft.core.methods import stage_named

    setup = Setup.from_config(config)
    base = setup.load_base_model(config.get("device", "auto"))
    task = stage_named(stage).build(base, setup.task, setup.data.seen, config.get("training", {}), setup.model,
                                    list(config.get("budgets", [])))
    return task if setup.pfl is None else OnPersonalBases(task, setup, base)


def federated_tasks() -> dict[str, Callable[[dict], FederatedTask]]:
    """The federated tasks of this package by the name a job gives them: the base model's training (``base``) and
    the federated stage of every method (``psg``, ``fedl2p``, ...). The Flower layer finds them through the
    ``fedp2eft.tasks`` entry point (pyproject.toml), so it never imports this module itself."""
    from fedp2eft.core.methods import STAGES

    return {"base": make_base_task, **{name: partial(make_stage_task, name) for name in STAGES}}


class OnPersonalBases:
    """A method's federated stage on a personalized-FL base, as in the paper: each client's work (local
    training, feature statistics) runs on its own personal base, the shared base with its state applied."""

    def __init__(self, task: FederatedTask, setup: Setup, base: nn.Module) -> None:
        self.task, self.setup, self.base = task, setup, base

    def __getattr__(self, name: str):
        if name == "task":  # not set yet (e.g. while unpickling): no delegation
            raise AttributeError(name)
        return getattr(self.task, name)

    def _personal(self, client_index: int):
        from fedp2eft.core.pfl import apply_overlay

        return apply_overlay(self.base, self.setup.personal_overlay(self.base, "seen", client_index))

    def client_update(self, weights: dict[str, torch.Tensor], client_index: int, server_round: int):
        with self._personal(client_index):
            return self.task.client_update(weights, client_index, server_round)

    def client_statistics(self, client_index: int) -> dict[str, torch.Tensor]:
        with self._personal(client_index):
            return self.task.client_statistics(client_index)
