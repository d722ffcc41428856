"""XNLI, MasakhaNEWS and Fed-Aya loaders on small local fixtures with the real schemas."""

import json
import time

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedp2eft.data.registry import load_dataset
from fedp2eft.errors import FedP2EFTError


def nli_rows(language, n):
    return [{"premise": f"{language} premise {i}", "hypothesis": f"{language} hypothesis {i}", "label": i % 3}
            for i in range(n)]


@pytest.fixture
def xnli_dir(tmp_path):
    for language in ("en", "sw"):
        folder = tmp_path / "xnli" / language
        folder.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(nli_rows(language, 300)), folder / "train.parquet")
        pq.write_table(pa.Table.from_pylist(nli_rows(language, 120)), folder / "test.parquet")
    return tmp_path / "xnli"


def test_xnli_local_copy_paper_partitioning(xnli_dir):
    data = load_dataset("xnli", path=str(xnli_dir), languages="en,sw", clients_per_language=2,
                        train_size=50, test_size=20)
    assert data.labels == ["entailment", "neutral", "contradiction"]
    assert len(data.seen) == len(data.unseen) == 4
    for client in data.seen + data.unseen:
        assert len(client.train) == 50 and len(client.test) == 20
        assert client.train[0]["text"].startswith(client.language) and "hypothesis" in client.train[0]["text_pair"]
    premises = [e["text"] for c in data.seen + data.unseen for e in c.train]
    assert len(premises) == len(set(premises))


def item(example) -> int:
    return int(example["text"].rsplit(" ", 1)[1])  # fixture texts end with the item (row) index


def items(clients, side):
    return {item(e) for c in clients for e in getattr(c, side)}


def test_xnli_pools_share_no_item_across_languages(tmp_path):
    languages = ("en", "de", "sw")
    for language in languages:
        folder = tmp_path / language
        folder.mkdir()
        train = nli_rows(language, 300)
        if language == "de":
            train[7]["label"] = -1  # an unlabeled row must not shift the item index of later rows
        pq.write_table(pa.Table.from_pylist(train), folder / "train.parquet")
        pq.write_table(pa.Table.from_pylist(nli_rows(language, 120)), folder / "test.parquet")
    for seed in (0, 1):
        data = load_dataset("xnli", path=str(tmp_path), languages=",".join(languages), clients_per_language=2,
                            train_size=50, test_size=20, seed=seed)
        for side, rows in (("train", 300), ("test", 120)):
            seen, unseen = items(data.seen, side), items(data.unseen, side)
            assert seen.isdisjoint(unseen)
            assert len(seen) <= rows // 2 and len(unseen) <= rows // 2  # one half per pool, whatever the language
            for language in languages:
                for pool in (data.seen, data.unseen):
                    assert items([c for c in pool if c.language == language], side)
        assert 7 not in {item(e) for c in data.seen + data.unseen if c.language == "de" for e in c.train}


def test_masakhanews_from_save_to_disk_with_string_labels(tmp_path):
    names = ["business", "entertainment", "health", "politics", "religion", "sports", "technology"]
    rows = {"hau": 140, "yor": 120}  # not parallel: every language is split on its own
    for language, n in rows.items():
        def split(n):
            return datasets.Dataset.from_list(
                [{"headline": f"{language} headline {i}", "text": "body", "label": names[i % 7]} for i in range(n)]
            )
        datasets.DatasetDict({"train": split(n), "test": split(n // 2)}).save_to_disk(str(tmp_path / language))
    data = load_dataset("masakhanews", path=str(tmp_path), languages=["hau", "yor"], clients_per_language=2)
    assert len(data.seen) == 4 and data.labels == names
    for client in data.seen + data.unseen:  # even share: rows / (2 pools x 2 clients); test only from trained labels
        assert len(client.train) == rows[client.language] // 4 and 1 <= len(client.test) <= rows[client.language] // 8
    assert data.seen[0].train[0]["text"].startswith(data.seen[0].language)
    for language in rows:
        for side in ("train", "test"):
            seen = {e["text"] for c in data.seen if c.language == language for e in getattr(c, side)}
            unseen = {e["text"] for c in data.unseen if c.language == language for e in getattr(c, side)}
            assert seen and unseen and seen.isdisjoint(unseen)


def test_schema_errors_name_the_split(xnli_dir):
    bad = xnli_dir / "en" / "test.parquet"
    pq.write_table(pa.Table.from_pylist([{"premise": "p", "hypothesis": "h", "label": 7}]), bad)
    with pytest.raises(FedP2EFTError, match=r"xnli/en/test: unknown label 7; expected 0..2"):
        load_dataset("xnli", path=str(xnli_dir), languages="en")
    pq.write_table(pa.Table.from_pylist([{"premise": "p", "label": 1}]), bad)
    with pytest.raises(FedP2EFTError, match=r"xnli/en/test row 1: empty or missing \['hypothesis'\]"):
        load_dataset("xnli", path=str(xnli_dir), languages="en")
    with pytest.raises(FedP2EFTError, match="no folder for language 'de'"):
        load_dataset("xnli", path=str(xnli_dir), languages="de")


def test_offline_without_local_copy_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(FedP2EFTError, match="path=DIR"):
        load_dataset("masakhanews", languages="hau")
    assert time.monotonic() - start < 5
    with pytest.raises(FedP2EFTError, match="local FedLLM-Bench"):
        load_dataset("fed-aya")


def test_fed_aya_real_clients_with_held_out_unseen(tmp_path):
    for c in range(12):
        language = ["ar", "en", "te"][c % 3]
        records = [{"inputs": f"q{c}-{i}", "targets": f"a{c}-{i}", "language": language} for i in range(10)]
        (tmp_path / f"{c}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = load_dataset("fed-aya", path=str(tmp_path), unseen_clients=4, seed=1)
    assert data.task == "instruction" and len(data.seen) == 8 and len(data.unseen) == 4
    client = data.seen[0]
    assert len(client.train) == 8 and len(client.test) == 2
    assert client.train[0]["instruction"].startswith(f"q{client.client_id}-")
    with pytest.raises(FedP2EFTError, match="unseen_clients=20"):
        load_dataset("fed-aya", path=str(tmp_path), unseen_clients=20)
