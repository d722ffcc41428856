"""The classification head for a dataset's labels: drawn from a seed and trained by the base stage only; anything
else that meets a checkpoint without a head for those labels (personalization, a generator stage, a reused
base.checkpoint) stops with both label sets instead of scoring with a random head."""

import json
from pathlib import Path

import pytest
import torch

from conftest import LABELS, bert_config, classification_examples, make_tokenizer
from fedp2eft.benchmark.config import resolve
from fedp2eft.core.modeling import SequenceClassifier, classifier_from_config
from fedp2eft.errors import FedP2EFTError
from fedp2eft.experiment import Setup, make_base_task, make_stage_task

OTHER_LABELS = ["negative", "neutral", "positive"]


def checkpoint(folder: Path, labels: list[str] | None) -> Path:
    """A tiny BERT checkpoint with its tokenizer: with a head for ``labels``, or a plain encoder (None)."""
    tokenizer = make_tokenizer()
    model = classifier_from_config(bert_config(len(tokenizer)), labels or LABELS)
    (model if labels else model.encoder).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def own_data(tmp_path) -> Path:
    """A JSONL dataset of four clients in one language; its labels are LABELS sorted (birds, cats, dogs)."""
    rows = [{"text": e["text"], "label": LABELS[e["label"]], "language": "xx", "client": f"c{client}"}
            for client in range(4) for e in classification_examples(12, seed=client)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_head_for_other_labels_is_refused_naming_both_label_sets(tmp_path):
    folder = checkpoint(tmp_path / "ckpt", OTHER_LABELS)
    with pytest.raises(FedP2EFTError) as error:
        SequenceClassifier.from_pretrained(folder, LABELS)
    message = str(error.value)
    assert "[negative, neutral, positive]" in message and "[cats, dogs, birds]" in message
    assert "train-base" in message
    with pytest.raises(FedP2EFTError, match="the same labels in another order"):
        SequenceClassifier.from_pretrained(checkpoint(tmp_path / "sorted", sorted(LABELS)), LABELS)
    assert SequenceClassifier.from_pretrained(folder).labels == OTHER_LABELS  # its own labels: its own head


def test_a_new_head_is_drawn_from_its_seed(tmp_path):
    folder = checkpoint(tmp_path / "encoder", None)
    with pytest.raises(FedP2EFTError, match="has no classification head, but the dataset has labels"):
        SequenceClassifier.from_pretrained(folder, LABELS)
    first, again, other = (SequenceClassifier.from_pretrained(folder, LABELS, new_head_seed=seed) for seed in (3, 3, 4))
    assert torch.equal(first.head.weight, again.head.weight) and torch.equal(first.head.bias, again.head.bias)
    assert not torch.equal(first.head.weight, other.head.weight)


def test_only_the_base_stage_creates_a_head_and_it_is_seeded(tmp_path, own_data):
    folder = checkpoint(tmp_path / "encoder", None)
    config = {"model": str(folder), "dataset": str(own_data), "dataset_options": {}, "max_length": 32,
              "device": "cpu", "training": {"mode": "full", "seed": 5}}
    heads = [{k: v for k, v in make_base_task(config).initial_weights().items() if k.startswith("head.")}
             for _ in range(2)]
    assert set(heads[0]) == {"head.weight", "head.bias"}  # the head travels, so FedAvg trains it
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    with pytest.raises(FedP2EFTError, match="has no classification head"):
        make_stage_task("psg", {**config, "training": {"personalize": {"max_rank": 4}}})
    with pytest.raises(FedP2EFTError, match="has no classification head"):
        Setup(str(folder), str(own_data), {}).load_base_model()


def test_a_base_checkpoint_with_other_labels_fails_validation(tmp_path, own_data):
    overrides = [f"dataset={own_data}", "dataset_options={}", "methods=[lora]"]
    folder = checkpoint(tmp_path / "other", OTHER_LABELS)
    with pytest.raises(FedP2EFTError, match=r"base.checkpoint: .* labels \[negative, neutral, positive\], but the "
                                            r"dataset has labels \[birds, cats, dogs\]"):
        resolve("quick", [*overrides, f"base.checkpoint={folder}"])
    with pytest.raises(FedP2EFTError, match="base.checkpoint: .* has no classification head"):
        resolve("quick", [*overrides, f"base.checkpoint={checkpoint(tmp_path / 'plain', None)}"])
    matching = checkpoint(tmp_path / "matching", sorted(LABELS))
    assert resolve("quick", [*overrides, f"base.checkpoint={matching}"])["base"]["checkpoint"] == str(matching)
