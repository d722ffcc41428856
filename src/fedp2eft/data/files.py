"""Your own data: JSONL, CSV or Parquet files (or a folder of them) -> FederatedDataset.

Columns: ``text`` (optional ``text_pair``), ``label``, ``language`` for classification; ``instruction``,
``response``, ``language`` for instruction tuning; optional for both ``client``, ``pool``, ``split`` and ``group``.
With ``client`` the clients are taken as they are (``pool`` names the unseen ones when the data fix them, else a
seeded share per language is unseen); otherwise each language's rows are partitioned into clients with Dirichlet
label skew (data/partition.py). Rows of one ``group`` stay on one side of every random split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedp2eft.data.file_readers import READERS, read_records
from fedp2eft.data.partition import group_by_label, partition_language, split_pools
from fedp2eft.data.types import ClientData, FederatedDataset
from fedp2eft.errors import FedP2EFTError

TASK_COLUMNS = {"classification": ("text", "label"), "instruction": ("instruction", "response")}
# ``group``: rows that share content (one document's pieces) stay on one side of every random split.
OPTIONAL = {"classification": ("text_pair", "group"), "instruction": ("group",)}
# What each known column may hold. Labels and client ids are names, so whole numbers (class ids) are fine too, but not
# floats: 1.0 and 1 would be two different labels.
COLUMN_TYPES = {"text": str, "text_pair": str, "instruction": str, "response": str, "language": str, "split": str,
                "pool": str, "group": (str, int),
                "label": (str, int), "client": (str, int)}


def read_rows(path: Path) -> list[dict]:
    """All rows of a file or of every supported file in a folder, each tagged with its origin; every file of a
    folder must have the same columns."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in READERS) if path.is_dir() else [path]
    if not files:
        raise FedP2EFTError(f"{path} holds no {'/'.join(READERS)} files")
    rows: list[dict] = []
    first: tuple[Path, set[str]] | None = None
    for file in files:
        records = read_records(file)
        columns = set(records[0][1])
        first = first or (file, columns)
        if columns != first[1]:
            raise FedP2EFTError(f"{file}: columns {sorted(columns)} differ from those of {first[0]} "
                                f"({sorted(first[1])}); every file of a folder needs the same columns")
        rows += [{**record, "_origin": f"{file} {where}"} for where, record in records]
    return rows


def detect_task(rows: list[dict], source: Path) -> str:
    columns = set(rows[0]) if rows else set()
    for task, needed in TASK_COLUMNS.items():
        if set(needed) <= columns:
            if "language" not in columns:
                raise FedP2EFTError(f"{source}: missing column 'language' (ISO code per row)")
            return task
    raise FedP2EFTError(
        f"{source}: missing columns; need text,label,language (classification) or "
        f"instruction,response,language (instruction tuning); found {sorted(columns - {'_origin'})}"
    )


def validate(rows: list[dict], task: str) -> None:
    """Every row has non-empty values in its required columns, values of the column's type and a known split."""
    required = (*TASK_COLUMNS[task], "language", *(c for c in ("client", "pool", "group") if c in rows[0]))
    for row in rows:
        for column in required:
            if row.get(column) is None or str(row[column]).strip() == "":
                raise FedP2EFTError(f"{row['_origin']}: empty '{column}'")
        for column, allowed in COLUMN_TYPES.items():
            value = row.get(column)
            if value is not None and (not isinstance(value, allowed) or isinstance(value, float | bool)):
                what = "text" if allowed is str else "text or a whole number (a name or an id)"
                raise FedP2EFTError(f"{row['_origin']}: '{column}' must be {what}, got {type(value).__name__} "
                                    f"{value!r}; store the column as strings")
        if row.get("split") not in (None, "train", "test"):
            raise FedP2EFTError(f"{row['_origin']}: split must be 'train' or 'test', got {row['split']!r}")
        if row.get("pool") not in (None, "seen", "unseen"):
            raise FedP2EFTError(f"{row['_origin']}: pool must be 'seen' or 'unseen', got {row['pool']!r}")
    if "pool" in rows[0] and "client" not in rows[0]:
        raise FedP2EFTError(f"{rows[0]['_origin']}: a 'pool' column needs a 'client' column (the pool is a client's)")


def label_space(rows: list[dict]) -> list[str]:
    """Labels seen in training; a test row with another label is an error (the model never saw it)."""
    train_labels = {str(r["label"]) for r in rows if r.get("split") != "test"}
    for row in rows:
        if row.get("split") == "test" and str(row["label"]) not in train_labels:
            raise FedP2EFTError(f"{row['_origin']}: label {row['label']!r} appears in no train row")
    return sorted(train_labels)


def to_example(row: dict, task: str, index: dict[str, int]) -> dict:
    example = {c: row[c] for c in (*TASK_COLUMNS[task], *OPTIONAL[task]) if row.get(c) is not None}
    if task == "classification":
        example["label"] = index[str(row["label"])]
    if "group" in example:
        example["group"] = str(example["group"])
    return example


def split_rows(rows: list[dict], test_fraction: float, rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """Use the ``split`` column when present, else a seeded random split (of whole groups when rows have a
    ``group``: a test row whose group was trained on would test memory)."""
    if any(r.get("split") for r in rows):
        return [r for r in rows if r.get("split") != "test"], [r for r in rows if r.get("split") == "test"]
    if "group" in rows[0]:
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(str(row["group"]), []).append(row)
        units = list(groups.values())
        order = rng.permutation(len(units))
        n_test = int(round(len(units) * test_fraction))
        return ([row for i in order[n_test:] for row in units[i]], [row for i in order[:n_test] for row in units[i]])
    order = rng.permutation(len(rows))
    n_test = int(round(len(rows) * test_fraction))
    return [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]]


def clients_as_given(rows, task, index, unseen_fraction, test_fraction, rng) -> tuple[list, list]:
    """One client per ``client`` value; the ``pool`` column names the unseen ones (data whose held-out clients are
    fixed, e.g. clients that share nothing with the others), else per language a seeded ``unseen_fraction``."""
    by_client: dict[str, list[dict]] = {}
    for row in rows:
        by_client.setdefault(str(row["client"]), []).append(row)
    if "pool" in rows[0]:
        return _clients_by_pool_column(by_client, task, index, test_fraction, rng)
    by_language: dict[str, list[ClientData]] = {}
    for client_id, client_rows in sorted(by_client.items()):
        client = _client(client_id, client_rows, task, index, test_fraction, rng)
        by_language.setdefault(client.language, []).append(client)
    seen, unseen = [], []
    for clients in by_language.values():
        order = rng.permutation(len(clients))
        n_unseen = int(round(len(clients) * unseen_fraction))
        unseen += [clients[i] for i in order[:n_unseen]]
        seen += [clients[i] for i in order[n_unseen:]]
    return seen, unseen


def _client(client_id: str, client_rows: list[dict], task, index, test_fraction, rng) -> ClientData:
    """One client's rows as a ClientData: its own split, its language (``multi`` when it writes several)."""
    languages = {r["language"] for r in client_rows}
    train, test = split_rows(client_rows, test_fraction, rng)
    if not train or not test:
        raise FedP2EFTError(f"client '{client_id}': needs both train and test rows ({client_rows[0]['_origin']})")
    language = sorted(languages)[0] if len(languages) == 1 else "multi"
    return ClientData(client_id, language, [to_example(r, task, index) for r in train],
                      [to_example(r, task, index) for r in test])


def _clients_by_pool_column(by_client: dict[str, list[dict]], task, index, test_fraction, rng) -> tuple[list, list]:
    pools: dict[str, list[ClientData]] = {"seen": [], "unseen": []}
    for client_id, client_rows in sorted(by_client.items()):
        named = {r["pool"] for r in client_rows}
        if len(named) != 1:
            raise FedP2EFTError(f"client '{client_id}': its rows name pools {sorted(named)}; a client is in one pool "
                                f"({client_rows[0]['_origin']})")
        pools[named.pop()].append(_client(client_id, client_rows, task, index, test_fraction, rng))
    return pools["seen"], pools["unseen"]


def label_pools(rows: list[dict], task: str, index: dict[str, int]) -> dict[int, list[dict]]:
    """Examples grouped by label; instruction data has one pseudo-label, so the split is uniform."""
    examples = [to_example(r, task, index) for r in rows]
    if task == "classification":
        return group_by_label(examples)
    return {0: examples} if examples else {}


def partitioned(rows, task, index, options, rng) -> tuple[list, list]:
    """Per language: 2K clients (K seen, K unseen), Dirichlet label skew, disjoint examples."""
    k = options["clients_per_language"]
    seen, unseen = [], []
    for language in sorted({r["language"] for r in rows}):
        train, test = split_rows([r for r in rows if r["language"] == language], options["test_fraction"], rng)
        train_pool, test_pool = label_pools(train, task, index), label_pools(test, task, index)
        train_size = options["train_size"] or len(train) // (2 * k)
        test_size = options["test_size"] or len(test) // (2 * k)
        if train_size < 1 or test_size < 1:
            raise FedP2EFTError(
                f"language '{language}': {len(train)} train / {len(test)} test rows cannot fill {2 * k} clients; "
                "lower clients_per_language or add data"
            )
        ids = [f"{language}-{pool}{i}" for pool in ("s", "u") for i in range(k)]
        clients = partition_language(language, train_pool, test_pool, ids, train_size, test_size, options["alpha"], rng,
                                     disjoint=True, strict=bool(options["train_size"] and options["test_size"]))
        pool_seen, pool_unseen = split_pools(clients, k)
        seen += pool_seen
        unseen += pool_unseen
    return seen, unseen


FILE_DEFAULTS = dict(seed=0, clients_per_language=2, train_size=None, test_size=None, alpha=0.5,
                     test_fraction=0.2, unseen_fraction=0.5, languages=None)


def load_files(path: str | Path, **options) -> FederatedDataset:
    """Federated dataset from user files (see module docstring for the columns)."""
    unknown = set(options) - set(FILE_DEFAULTS)
    if unknown:
        raise FedP2EFTError(f"{path}: unknown option(s) {sorted(unknown)}; known: {sorted(FILE_DEFAULTS)}")
    options = {**FILE_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    source = Path(path).expanduser()
    if not source.exists():
        raise FedP2EFTError(f"{source} does not exist")
    rows = read_rows(source)
    task = detect_task(rows, source)
    validate(rows, task)
    if options["languages"]:
        wanted = set(options["languages"].split(",") if isinstance(options["languages"], str) else options["languages"])
        missing = wanted - {r["language"] for r in rows}
        if missing:
            raise FedP2EFTError(f"{source}: no rows for language(s) {sorted(missing)}")
        rows = [r for r in rows if r["language"] in wanted]
    labels = label_space(rows) if task == "classification" else []
    index = {label: i for i, label in enumerate(labels)}
    rng = np.random.default_rng(options["seed"])
    if "client" in rows[0]:
        seen, unseen = clients_as_given(rows, task, index, options["unseen_fraction"], options["test_fraction"], rng)
    else:
        seen, unseen = partitioned(rows, task, index, options, rng)
    return FederatedDataset(source.name, task, labels, seen, unseen, {"source": str(source), "options": options})
