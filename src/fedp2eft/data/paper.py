"""The paper's benchmarks (docs/data.md): XNLI and MasakhaNEWS through ``datasets``, Fed-Aya from FedLLM-Bench.

Online, XNLI and MasakhaNEWS are fetched from the Hugging Face hub. Offline, pass ``path=`` to a
local copy: one sub-folder per language holding ``train`` and ``test`` data files (parquet, arrow,
jsonl, json or csv) or a ``datasets`` ``save_to_disk`` folder. Without hub access and without a
local copy the loader stops at once with instructions instead of waiting on retries. Fed-Aya cannot be
downloaded automatically: it is read from the file FedLLM-Bench releases (``path=``, see ``load_fed_aya``).
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

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


# FedLLM-Bench's Fed-Aya as released (docs/data.md): one JSON object, client id -> list of records
# {"instruction", "response", "language", ...}, read by FedLLM-Bench's utils/benchmark_dataset.py and by the
# paper's own loader (royson/fedp2eft, src/data/fedaya_dataset.py).
FED_AYA_FILE = "aya_38c_25k.json"
FED_AYA_FOLDER = "Fed-Aya"
FED_AYA_FIELDS = ("instruction", "response", "language")
FED_AYA_SOURCE = "https://github.com/rui-ye/FedLLM-Bench (README, 'Dataset': a Google Drive archive)"
# Aya's own language names (as in the Aya dataset and FedLLM-Bench's evaluation set) for the paper's languages.
AYA_LANGUAGE_NAMES = {"standard arabic": "ar", "english": "en", "spanish": "es", "french": "fr",
                      "portuguese": "pt", "russian": "ru", "telugu": "te", "simplified chinese": "zh"}


def fed_aya_file(path) -> Path:
    """The released data file, from the file itself, the ``Fed-Aya`` folder it sits in, or the ``data`` folder
    the archive unpacks to, so whichever of the three a user has at hand works."""
    if path is None:
        raise FedP2EFTError(
            f"fed-aya: no path given. Pass FedLLM-Bench's Fed-Aya data (its {FED_AYA_FILE} or the {FED_AYA_FOLDER} "
            f"folder holding it): benchmark dataset_options.path=DIR, data describe --path DIR. It cannot be "
            f"downloaded automatically; get the archive from {FED_AYA_SOURCE} and unzip it (docs/data.md)"
        )
    given = Path(path).expanduser()
    if given.is_file():
        return given
    if not given.exists():
        raise FedP2EFTError(f"fed-aya: {given} does not exist; pass the path of {FED_AYA_FILE} or of the "
                            f"{FED_AYA_FOLDER} folder unzipped from FedLLM-Bench's data archive (docs/data.md)")
    for candidate in (given / FED_AYA_FILE, given / FED_AYA_FOLDER / FED_AYA_FILE):
        if candidate.is_file():
            return candidate
    raise FedP2EFTError(
        f"fed-aya: no {FED_AYA_FILE} in {given} or in {given / FED_AYA_FOLDER}; pass the file itself or the "
        f"{FED_AYA_FOLDER} folder of FedLLM-Bench's data archive (docs/data.md)"
    )


def _read_fed_aya(file: Path) -> dict[str, list]:
    """The file's client -> records mapping, refusing any other shape before a record is looked at."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FedP2EFTError(f"fed-aya: {file} is not valid UTF-8 JSON ({error}); is the download complete?") from error
    if not isinstance(data, dict) or not data:
        found = type(data).__name__ if data else "nothing"
        raise FedP2EFTError(f"fed-aya: {file} must hold one JSON object mapping each client id to its list of "
                            f"records, as FedLLM-Bench releases it; found {found}")
    for key, records in data.items():
        if not isinstance(records, list):
            raise FedP2EFTError(f"fed-aya: {file}, client '{key}': expected a list of records, "
                                f"found {type(records).__name__}")
    return data


def aya_language(value: str) -> str:
    """A record's language as a code: codes stay, Aya's names of the paper's languages become codes."""
    return AYA_LANGUAGE_NAMES.get(value.strip().replace("_", " ").lower(), value.strip())


def _fed_aya_record(record, where: str) -> tuple[str, dict]:
    """(language, example) of one record; a record without the fields Fed-Aya has is an error, never skipped."""
    if not isinstance(record, dict):
        raise FedP2EFTError(f"{where}: expected an object with {', '.join(FED_AYA_FIELDS)}, "
                            f"found {type(record).__name__}")
    bad = [f for f in FED_AYA_FIELDS if not isinstance(record.get(f), str) or not record[f].strip()]
    if bad:
        raise FedP2EFTError(f"{where}: missing or empty {bad}; every record needs non-empty "
                            f"{', '.join(FED_AYA_FIELDS)} (found keys {sorted(record)})")
    return aya_language(record["language"]), {"instruction": record["instruction"], "response": record["response"]}


def _fed_aya_client(key: str, examples: list[tuple[str, dict]], test_fraction: float,
                    rng: np.random.Generator) -> ClientData:
    """One real client: its own examples split ``test_fraction`` test (rounded up, as the paper's
    ``train_test_split``); its language is its most frequent one (ties: the first code in sorted order)."""
    counts = Counter(language for language, _ in examples)
    language = min(counts, key=lambda code: (-counts[code], code))
    order = rng.permutation(len(examples))
    n_test = min(len(examples) - 1, max(1, math.ceil(len(examples) * test_fraction)))
    train = [examples[i][1] for i in sorted(order[n_test:])]
    test = [examples[i][1] for i in sorted(order[:n_test])]
    return ClientData(str(key), language, train, test)


def _held_out(keys: list[str], usable: list[str], unseen_clients, seed: int, file: Path) -> set[str]:
    """The unseen clients: ``unseen_clients`` of the usable ones drawn with ``seed``, or the ones named by client
    id or by 0-based position in the file (the paper's code holds out positions 21-27 and 34)."""
    if isinstance(unseen_clients, int) and not isinstance(unseen_clients, bool):
        if not 0 <= unseen_clients < len(usable):
            raise FedP2EFTError(
                f"fed-aya: {len(usable)} usable clients in {file} (at least 2 examples in the chosen languages), "
                f"need more than unseen_clients={unseen_clients} so that some stay seen; lower unseen_clients "
                f"or widen languages"
            )
        drawn = np.random.default_rng(seed).choice(len(usable), size=unseen_clients, replace=False)
        return {usable[i] for i in drawn.tolist()}
    if not isinstance(unseen_clients, (list, tuple)):
        raise FedP2EFTError(f"fed-aya: unseen_clients must be a number or a list of client ids or positions, "
                            f"got {unseen_clients!r}")
    chosen = set()
    for entry in unseen_clients:
        if isinstance(entry, int) and not isinstance(entry, bool) and 0 <= entry < len(keys):
            entry = keys[entry]
        if str(entry) not in usable:
            raise FedP2EFTError(f"fed-aya: unseen client {entry!r} is not a usable client of {file} (client ids "
                                f"or positions 0..{len(keys) - 1}, with at least 2 examples in the chosen languages)")
        chosen.add(str(entry))
    if len(chosen) >= len(usable):
        raise FedP2EFTError(f"fed-aya: unseen_clients names all {len(usable)} usable clients of {file}; "
                            f"some must stay seen")
    return chosen


def load_fed_aya(
    path=None, seed: int = 0, unseen_clients: int | list = 8, test_fraction: float = 0.2, languages=None
) -> FederatedDataset:
    """Fed-Aya as FedLLM-Bench releases it (``Fed-Aya/aya_38c_25k.json``, docs/data.md): real clients with
    their own data, records outside ``languages`` dropped (as the paper's loader does); each client split
    ``test_fraction`` test, since the release ships no per-client test split; ``unseen_clients`` held out."""
    if not 0 < test_fraction < 1:
        raise FedP2EFTError(f"fed-aya: test_fraction must lie in (0, 1), got {test_fraction}")
    file = fed_aya_file(path)
    data = _read_fed_aya(file)
    explicit = languages is not None
    wanted = set(languages.split(",") if isinstance(languages, str) else languages or FED_AYA_LANGUAGES)
    present: set[str] = set()
    clients: dict[str, ClientData] = {}
    for position, (key, records) in enumerate(data.items()):
        examples = [_fed_aya_record(r, f"fed-aya: {file}, client '{key}', record {n}")
                    for n, r in enumerate(records, start=1)]
        present |= {language for language, _ in examples}
        examples = [e for e in examples if e[0] in wanted]
        if len(examples) >= 2:  # a client without train and test data in the chosen languages takes no part
            rng = np.random.default_rng([seed, position])  # one stream per client: filters elsewhere change nothing
            clients[str(key)] = _fed_aya_client(str(key), examples, test_fraction, rng)
    absent = sorted(wanted - present) if explicit else []
    if absent:
        raise FedP2EFTError(f"fed-aya: no record of {file} has language(s) {absent}; present: {sorted(present)}")
    held_out = _held_out([str(k) for k in data], list(clients), unseen_clients, seed, file)
    seen = [c for key, c in clients.items() if key not in held_out]
    unseen = [c for key, c in clients.items() if key in held_out]
    info = {"source": str(file), "seed": seed, "languages": sorted(wanted), "test_fraction": test_fraction,
            "unseen_clients": [c.client_id for c in unseen]}
    return FederatedDataset("fed-aya", "instruction", [], seen, unseen, info)
