"""The paper's benchmarks (docs/data.md): XNLI and MasakhaNEWS through ``datasets``, Fed-Aya from FedLLM-Bench.

Online, XNLI and MasakhaNEWS are fetched from the Hugging Face hub. Offline, pass ``path=`` to a
local copy: one sub-folder per language holding ``train`` and ``test`` data files (parquet, arrow,
jsonl, json or csv) or a ``datasets`` ``save_to_disk`` folder. Without hub access and without a
local copy the loader stops at once with instructions instead of waiting on retries.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from fedp2eft.data.files import read_rows
from fedp2eft.data.partition import group_by_label, partition_language, split_items
from fedp2eft.data.types import ClientData, FederatedDataset
from fedp2eft.errors import FedP2EFTError

XNLI = dict(
    hub_id="facebook/xnli",
    languages=["ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh"],
    labels=["entailment", "neutral", "contradiction"],
    fields={"text": "premise", "text_pair": "hypothesis"},
    defaults=dict(clients_per_language=20, train_size=100, test_size=25),
)
MASAKHANEWS = dict(
    hub_id="masakhane/masakhanews",
    languages=["amh", "eng", "fra", "hau", "ibo", "lin", "lug", "orm",
               "pcm", "run", "sna", "som", "swa", "tir", "xho", "yor"],
    labels=["business", "entertainment", "health", "politics", "religion", "sports", "technology"],
    fields={"text": "headline"},
    defaults=dict(clients_per_language=10, train_size=None, test_size=None),
)
FED_AYA_LANGUAGES = ["ar", "en", "es", "fr", "pt", "ru", "te", "zh"]
POOLS = ("seen", "unseen")
DATA_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check so an offline machine fails in seconds, not after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _local_language(folder: Path):
    """A DatasetDict with train and test splits from one language folder."""
    import datasets

    if (folder / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(folder))
    files: dict[str, list[str]] = {}
    kinds = set()
    for split in ("train", "test"):
        found = sorted(p for p in folder.iterdir() if p.name.startswith(split) and p.suffix in DATA_SUFFIXES)
        if not found:
            raise FedP2EFTError(f"{folder}: no '{split}' data file ({', '.join(DATA_SUFFIXES)})")
        files[split] = [str(p) for p in found]
        kinds |= {DATA_SUFFIXES[p.suffix] for p in found}
    if len(kinds) != 1:
        raise FedP2EFTError(f"{folder}: mixed file types {sorted(kinds)}; use one format per language")
    return datasets.load_dataset(kinds.pop(), data_files=files)


def _hub_language(hub_id: str, language: str, name: str):
    import datasets

    if not hub_reachable():
        raise FedP2EFTError(
            f"{name}: the Hugging Face hub is not reachable and no local copy was given. Download "
            f"'{hub_id}' elsewhere (e.g. datasets.load_dataset('{hub_id}', '<lang>').save_to_disk('DIR/<lang>')) "
            f"and pass path=DIR (CLI: --path DIR); see docs/data.md"
        )
    try:
        return datasets.load_dataset(hub_id, language)
    except Exception as error:  # datasets raises many types for network/config problems
        raise FedP2EFTError(
            f"{name}: loading '{hub_id}' ({language}) failed: {error}; pass path=DIR to a local copy"
        ) from error


def _label_index(value, names: list[str], where: str) -> int:
    """Integer class ids as in the hub datasets, or the class names themselves."""
    if isinstance(value, (int, np.integer)) and 0 <= int(value) < len(names):
        return int(value)
    if str(value) in names:
        return names.index(str(value))
    raise FedP2EFTError(f"{where}: unknown label {value!r}; expected 0..{len(names) - 1} or one of {names}")


def _examples(split, spec: dict, where: str) -> dict[int, dict]:
    """Labeled examples keyed by row position, which identifies the item across parallel languages."""
    missing = {*spec["fields"].values(), "label"} - set(split.column_names)
    if missing:
        raise FedP2EFTError(f"{where}: missing column(s) {sorted(missing)}; found {split.column_names}")
    out = {}
    for number, row in enumerate(split, start=1):
        if row["label"] is None or (isinstance(row["label"], int) and row["label"] < 0):
            continue  # unlabeled rows (-1) in some releases
        example = {key: row[column] for key, column in spec["fields"].items()}
        empty = [column for column in spec["fields"].values() if not row[column]]
        if empty:
            raise FedP2EFTError(f"{where} row {number}: empty or missing {empty}")
        example["label"] = _label_index(row["label"], spec["labels"], where)
        out[number - 1] = example
    return out


def _pool_examples(split, spec: dict, seed: int, where: str) -> dict[str, list[dict]]:
    """The split's labeled examples for each client pool: one seeded shuffle of the row indices,
    first half seen, second half unseen (``split_items``); aligned across parallel languages."""
    examples = _examples(split, spec, where)
    halves = split_items(len(split), seed)
    return {pool: [examples[i] for i in sorted(half.tolist()) if i in examples] for pool, half in zip(POOLS, halves)}


def load_classification(
    name: str, spec: dict, path=None, languages=None, seed: int = 0, alpha: float = 0.5, **sizes
) -> FederatedDataset:
    """XNLI or MasakhaNEWS with the paper's partitioning: per language K seen and K unseen clients,
    Dirichlet(alpha) label skew, disjoint examples; sizes ``None`` mean an even share of a pool.

    Seen clients draw only from seen items and unseen clients only from unseen items, the same item
    halves in every language of a parallel corpus (XNLI), so no translation of a training item of one
    pool trains the other pool."""
    unknown = set(sizes) - set(spec["defaults"])
    if unknown:
        raise FedP2EFTError(f"{name}: unknown option(s) {sorted(unknown)}")
    sizes = {**spec["defaults"], **{k: v for k, v in sizes.items() if v is not None}}
    if isinstance(languages, str):
        languages = languages.split(",")
    languages = list(languages or spec["languages"])
    rng = np.random.default_rng(seed)
    k = sizes["clients_per_language"]
    clients: dict[str, list[ClientData]] = {pool: [] for pool in POOLS}
    for language in languages:
        if path is not None:
            folder = Path(path).expanduser() / language
            if not folder.is_dir():
                raise FedP2EFTError(f"{name}: local copy {Path(path)} has no folder for language '{language}'")
            data = _local_language(folder)
        else:
            data = _hub_language(spec["hub_id"], language, name)
        train = _pool_examples(data["train"], spec, seed, f"{name}/{language}/train")
        test = _pool_examples(data["test"], spec, seed, f"{name}/{language}/test")
        train_size = sizes["train_size"] or min(len(train[pool]) for pool in POOLS) // k
        test_size = sizes["test_size"] or min(len(test[pool]) for pool in POOLS) // k
        for pool in POOLS:
            ids = [f"{language}-{pool[0]}{i}" for i in range(k)]
            clients[pool] += partition_language(
                language, group_by_label(train[pool]), group_by_label(test[pool]), ids, train_size, test_size,
                alpha, rng, disjoint=True, strict=bool(sizes["train_size"] and sizes["test_size"]),
            )
    source = str(path) if path else spec["hub_id"]
    info = {"source": source, "languages": languages, "seed": seed, "alpha": alpha, **sizes}
    return FederatedDataset(name, "classification", spec["labels"], clients["seen"], clients["unseen"], info)


def load_xnli(**options) -> FederatedDataset:
    return load_classification("xnli", XNLI, **options)


def load_masakhanews(**options) -> FederatedDataset:
    return load_classification("masakhanews", MASAKHANEWS, **options)


def load_fed_aya(
    path=None, seed: int = 0, unseen_clients: int = 8, test_fraction: float = 0.2, languages=None
) -> FederatedDataset:
    """Fed-Aya from a local FedLLM-Bench folder: one JSON/JSONL file per real client (file name =
    client id), records with ``instruction``/``response`` (or Aya's ``inputs``/``targets``) and
    ``language``. Clients stay as they are; a seeded ``unseen_clients`` of them are held out."""
    if path is None:
        raise FedP2EFTError(
            "fed-aya: pass path=DIR (CLI: --path DIR) to a local FedLLM-Bench Fed-Aya folder with one "
            "JSON/JSONL file per client; it cannot be downloaded automatically (see docs/data.md)"
        )
    folder = Path(path).expanduser()
    files = sorted(p for p in folder.glob("*") if p.suffix in (".json", ".jsonl")) if folder.is_dir() else []
    if not files:
        raise FedP2EFTError(f"fed-aya: {folder} holds no per-client .json/.jsonl files")
    wanted = set(languages.split(",") if isinstance(languages, str) else languages or FED_AYA_LANGUAGES)
    rng = np.random.default_rng(seed)
    clients = []
    for file in files:
        examples, client_languages = [], []
        for row in read_rows(file):
            instruction, response = row.get("instruction", row.get("inputs")), row.get("response", row.get("targets"))
            if not instruction or not response or not row.get("language"):
                raise FedP2EFTError(f"{row['_origin']}: needs instruction/inputs, response/targets and language")
            client_languages.append(str(row["language"]))
            if str(row["language"]) in wanted:
                examples.append({"instruction": instruction, "response": response})
        if len(examples) < 2:
            continue  # a client with no data in the requested languages takes no part
        order = rng.permutation(len(examples))
        n_test = max(1, int(round(len(examples) * test_fraction)))
        language = max(set(client_languages), key=client_languages.count)  # the client's main language
        train, test = [examples[i] for i in order[n_test:]], [examples[i] for i in order[:n_test]]
        clients.append(ClientData(file.stem, language, train, test))
    if len(clients) <= unseen_clients:
        raise FedP2EFTError(
            f"fed-aya: {len(clients)} usable clients in {folder}, need more than unseen_clients={unseen_clients}"
        )
    held_out = set(rng.choice(len(clients), size=unseen_clients, replace=False).tolist())
    seen = [c for i, c in enumerate(clients) if i not in held_out]
    unseen = [c for i, c in enumerate(clients) if i in held_out]
    return FederatedDataset("fed-aya", "instruction", [], seen, unseen, {"source": str(folder), "seed": seed})
