"""Parquet cache of built federated datasets: one table of examples plus a manifest.

A build is keyed by a string describing everything it depends on (options, package versions), so
another option set gets its own entry and an unchanged one is read back instead of rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fedp2eft.cache import cache_dir
from fedp2eft.data.types import ClientData, FederatedDataset

FIELDS = ("text", "text_pair", "label", "instruction", "response")
SCHEMA = pa.schema(
    [("pool", pa.string()), ("client", pa.string()), ("language", pa.string()), ("split", pa.string())]
    + [(f, pa.int64() if f == "label" else pa.string()) for f in FIELDS]
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(dataset: FederatedDataset, folder: Path) -> None:
    """Write ``dataset`` into ``folder`` atomically (temp dir + rename)."""
    rows = {name: [] for name in SCHEMA.names}
    order = []
    for pool in ("seen", "unseen"):
        for client in dataset.pool(pool):
            order.append([pool, client.client_id, client.language])
            for split in ("train", "test"):
                for example in getattr(client, split):
                    where = {"pool": pool, "client": client.client_id, "language": client.language, "split": split}
                    for key, value in where.items():
                        rows[key].append(value)
                    for f in FIELDS:
                        rows[f].append(example.get(f))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        pq.write_table(pa.table(rows, schema=SCHEMA), tmp / "data.parquet")
        manifest = {
            "name": dataset.name, "task": dataset.task, "labels": dataset.labels, "clients": order,
            "info": dataset.info, "sha256": _sha256(tmp / "data.parquet"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(folder: Path) -> FederatedDataset | None:
    """The dataset in ``folder``, or None when it is missing, incomplete or altered."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if _sha256(folder / "data.parquet") != manifest["sha256"]:
            return None
        table = pq.read_table(folder / "data.parquet").to_pylist()
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return None
    fields = ("text", "text_pair", "label") if manifest["task"] == "classification" else ("instruction", "response")
    clients = {cid: ClientData(cid, language, [], []) for _, cid, language in manifest["clients"]}
    for row in table:
        example = {f: row[f] for f in fields if row[f] is not None}
        getattr(clients[row["client"]], row["split"]).append(example)
    pools = {"seen": [], "unseen": []}
    for pool, cid, _ in manifest["clients"]:
        pools[pool].append(clients[cid])
    return FederatedDataset(
        manifest["name"], manifest["task"], manifest["labels"], pools["seen"], pools["unseen"], manifest["info"]
    )


def cached(name: str, key: str, build: Callable[[], FederatedDataset]) -> FederatedDataset:
    """Read the build of ``key`` from the cache, or build and store it first."""
    folder = cache_dir() / "data" / name / hashlib.sha256(key.encode()).hexdigest()[:16]
    dataset = load(folder)
    if dataset is None:
        dataset = build()
        save(dataset, folder)
    return dataset
