"""Dataset name -> loader; every loader returns a FederatedDataset.

Names: ``intents`` (embedded, offline default), ``intents-chat`` (its embedded instruction twin), ``xnli``, ``masakhanews``, ``fed-aya``, or a path to
your own JSONL/CSV/Parquet file or folder.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from fedp2eft.data.files import load_files
from fedp2eft.data.intents import load_intents, load_intents_chat
from fedp2eft.data.paper import load_fed_aya, load_masakhanews, load_xnli
from fedp2eft.data.types import FederatedDataset
from fedp2eft.errors import FedP2EFTError

LOADERS = {"intents": load_intents, "intents-chat": load_intents_chat, "xnli": load_xnli, "masakhanews": load_masakhanews, "fed-aya": load_fed_aya}


def dataset_names() -> list[str]:
    """Named datasets (any file or folder path is accepted too)."""
    return sorted(LOADERS)


# Read only from a user's local files and quick to read, so a benchmark loads them once before any work.
LOCAL_ONLY = {"fed-aya"}


def _bind(name: str, options: dict) -> None:
    try:
        inspect.signature(LOADERS[name]).bind(**options)
    except TypeError as error:  # an option the loader does not take
        raise FedP2EFTError(f"{name}: {error}") from error


def check_dataset(name: str, options: dict) -> None:
    """Fail before any work: an option a named loader does not take, and for a local-only dataset (Fed-Aya, your
    own files) anything its loader refuses (no path, a missing file, a bad record), since reading it takes seconds."""
    if name not in LOADERS:
        load_files(name, **options)
        return
    _bind(name, options)
    if name in LOCAL_ONLY:
        LOADERS[name](**options)


def load_dataset(name: str, **options) -> FederatedDataset:
    """Load ``name`` with loader-specific ``options`` (seed, sizes, alpha, languages, path, ...)."""
    if name in LOADERS:
        _bind(name, options)
        return LOADERS[name](**options)
    if Path(name).expanduser().exists():
        return load_files(name, **options)
    raise FedP2EFTError(
        f"unknown dataset '{name}': use one of {', '.join(dataset_names())} or an existing file/folder path"
    )
