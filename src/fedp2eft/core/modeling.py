"""Task models. Classification uses masked mean pooling over the encoder, so it never relies on a pooler
(the embedded e5 checkpoint ships none, and e5 itself was trained with mean pooling)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig

from fedp2eft.errors import FedP2EFTError

HEAD_FILE = "classifier_head.safetensors"
DECODER_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")  # architectures that generate text
LABELS_FILE = "labels.json"


@dataclass
class ClassifierOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


class SequenceClassifier(nn.Module):
    """Encoder -> mean of the real tokens' last hidden states -> Linear(num_labels)."""

    def __init__(self, encoder: nn.Module, labels: list[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.labels = list(labels)
        self.head = nn.Linear(encoder.config.hidden_size, len(labels))

    @property
    def config(self) -> PretrainedConfig:
        return self.encoder.config

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> ClassifierOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        logits = self.head(pooled)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, directory: str | Path) -> None:
        """A Hugging Face encoder checkpoint plus the head and label names beside it."""
        directory = Path(directory)
        self.encoder.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(directory / HEAD_FILE))
        (directory / LABELS_FILE).write_text(json.dumps(self.labels))

    @classmethod
    def from_pretrained(cls, directory: str | Path, labels: list[str] | None = None,
                        new_head_seed: int | None = None) -> SequenceClassifier:
        """Load an encoder checkpoint with its head for ``labels`` (default: the saved ones). A checkpoint without a
        head for exactly these labels is an error, unless ``new_head_seed`` is given: then a fresh head is drawn from
        that seed. Only base training passes it, since it trains the head; any other use of a fresh head would
        score with random, frozen weights."""
        directory = Path(directory)
        saved = saved_labels(directory)
        labels = list(labels or saved or [])
        if not labels:
            raise FedP2EFTError(f"{directory} holds no label list; pass the dataset's labels")
        if saved != labels and new_head_seed is None:
            raise FedP2EFTError(head_mismatch(directory, saved, labels))
        with readable_checkpoint(directory):
            encoder = AutoModel.from_pretrained(directory, **_without_pooler(AutoConfig.from_pretrained(directory)))
            with torch.random.fork_rng(devices=[]):  # a new head comes from its seed alone, the caller's stream untouched
                torch.manual_seed(new_head_seed or 0)
                model = cls(encoder, labels)
            if saved == labels:
                model.head.load_state_dict(load_file(str(directory / HEAD_FILE)))
        return model


def saved_labels(directory: str | Path) -> list[str] | None:
    """The labels of the classification head saved in ``directory``; None when it holds no head (e.g. a plain
    encoder such as the embedded e5)."""
    directory = Path(directory)
    if not (directory / HEAD_FILE).is_file() or not (directory / LABELS_FILE).is_file():
        return None
    return list(json.loads((directory / LABELS_FILE).read_text()))


def head_mismatch(directory: str | Path, saved: list[str] | None, labels: list[str]) -> str:
    """Why the checkpoint in ``directory`` cannot classify ``labels``, naming both label sets, and what to do."""
    remedy = ("train a base model on this dataset (`fedp2eft benchmark` with base.checkpoint empty, or "
              "`fedp2eft train-base`), or use the dataset the checkpoint was trained on")
    if saved is None:
        return (f"{directory} has no classification head, but the dataset has labels {_label_list(labels)}, whose "
                f"head the base stage trains; {remedy}")
    only_saved, only_dataset = sorted(set(saved) - set(labels)), sorted(set(labels) - set(saved))
    if not only_saved and not only_dataset:
        difference = " (the same labels in another order)"
    elif len(only_saved) < len(saved):
        difference = (f" (only the checkpoint has {_label_list(only_saved)}, only the dataset "
                      f"{_label_list(only_dataset)})")
    else:
        difference = ""
    return (f"{directory} has a classification head for labels {_label_list(saved)}, but the dataset has labels "
            f"{_label_list(labels)}{difference}; {remedy}")


def _label_list(labels: list[str], shown: int = 6) -> str:
    """A label list short enough for one error line."""
    names = ", ".join(labels[:shown]) + (f", ... ({len(labels)} in all)" if len(labels) > shown else "")
    return f"[{names}]"


def adapter_carried_modules(model: nn.Module) -> list[str]:
    """Modules of ``model`` a personalized adapter must carry besides its LoRA (PEFT's ``modules_to_save``) so
    that loading it onto the plain encoder reproduces the personalized model: a classifier's head, which was
    trained with the base model, not saved in the encoder checkpoint. A causal LM's output layer is part of its
    checkpoint: none."""
    return ["head"] if isinstance(model, SequenceClassifier) else []


def _without_pooler(config: PretrainedConfig) -> dict:
    """BERT-family encoders build an (untrained, unused) pooler unless told not to."""
    return {"add_pooling_layer": False} if config.model_type in {"bert", "xlm-roberta", "roberta"} else {}


def classifier_from_config(config: PretrainedConfig, labels: list[str], seed: int = 0) -> SequenceClassifier:
    """A randomly initialised classifier (tests and from-scratch runs)."""
    torch.manual_seed(seed)
    return SequenceClassifier(AutoModel.from_config(config, **_without_pooler(config)), labels)


def load_causal_lm(directory: str | Path) -> nn.Module:
    """A decoder with its language-model head; an encoder-only checkpoint (e.g. an embedding model given an
    instruction dataset) is refused with what to use instead."""
    config = AutoConfig.from_pretrained(directory)
    architectures = config.architectures or []
    if architectures and not any(name.endswith(DECODER_HEADS) for name in architectures):
        raise FedP2EFTError(
            f"{directory} holds a {', '.join(architectures)} ('{config.model_type}'), not a decoder: instruction "
            "datasets need a causal language model (e.g. model gemma-3-270m, or a Hugging Face decoder such as "
            "Llama); use a classification dataset with this model")
    with readable_checkpoint(directory):
        return AutoModelForCausalLM.from_pretrained(directory)


@contextmanager
def readable_checkpoint(directory: str | Path) -> Iterator[None]:
    """Turn the errors of a damaged checkpoint file (cut off by a full disk or a killed copy: safetensors refuses
    it, or the file cannot be read) into one error that names the folder and what to do."""
    try:
        yield
    except (SafetensorError, OSError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FedP2EFTError(f"the checkpoint in {directory} is damaged or unreadable ({reason}); copy or "
                            "train it again (a base model: `fedp2eft benchmark` redoes a stage whose folder is "
                            "deleted)") from None


def frozen_copy(base_model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares the base model's parameters instead of duplicating them.

    PEFT swaps modules in the copy's tree only and freezes the (shared) base weights, so many personalized
    models can live side by side at the cost of their LoRA weights, not of the whole model."""
    return copy.deepcopy(base_model, memo={id(p): p for p in base_model.parameters()})
