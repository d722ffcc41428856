"""XNLI, MasakhaNEWS and Fed-Aya loaders on small local fixtures with the real schemas."""

import json
import math
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
    with pytest.raises(FedP2EFTError, match="fed-aya: no path given"):
        load_dataset("fed-aya")


# Fed-Aya as FedLLM-Bench releases it (docs/data.md): the archive unzips to data/Fed-Aya/, whose federated file
# aya_38c_25k.json is one JSON object mapping each client id to the list of its records
# {"instruction", "response", "language"} (FedLLM-Bench utils/benchmark_dataset.py and utils/template.py; the
# paper's loader, royson/fedp2eft src/data/fedaya_dataset.py, filters on "language" by code). Next to it,
# local/local_<lang>.json feed FedLLM-Bench's single-client baselines and must be ignored. The client ids' exact
# form is not documented; the loader treats them as opaque strings.
AYA_CLIENTS = {
    "c9f1": [("ar", "ما هي عاصمة مصر؟", "القاهرة."), ("ar", "كم يوما في الأسبوع؟", "سبعة أيام."),
             ("ar", "ما لون السماء؟", "أزرق."), ("ar", "ما هو أكبر محيط؟", "المحيط الهادئ."),
             ("ar", "من كتب ألف ليلة وليلة؟", "مؤلف مجهول.")],
    "07ab": [("en", "Capital of France?", "Paris."), ("en", "Two plus two?", "Four."), ("fr", "Bonjour ?", "Salut."),
             ("en", "Largest planet?", "Jupiter."), ("en", "Colour of snow?", "White.")],
    "5e22": [("te", "భారతదేశ రాజధాని ఏది?", "న్యూ ఢిల్లీ."), ("te", "వారంలో ఎన్ని రోజులు?", "ఏడు."),
             ("te", "ఆకాశం రంగు ఏమిటి?", "నీలం."), ("te", "తెలుగు ఏ రాష్ట్ర భాష?", "ఆంధ్రప్రదేశ్."),
             ("te", "సూర్యుడు ఎక్కడ ఉదయిస్తాడు?", "తూర్పు.")],
    "d410": [("zh", "中国的首都是哪里？", "北京。"), ("zh", "一年有几个月？", "十二个月。"),
             ("zh", "水的沸点是多少？", "100摄氏度。"), ("zh", "熊猫吃什么？", "竹子。")],
    "a003": [("es", "¿Capital de España?", "Madrid."), ("pt", "Capital do Brasil?", "Brasília."),
             ("es", "¿Cuántos días tiene una semana?", "Siete."), ("pt", "Quantos meses tem um ano?", "Doze."),
             ("es", "¿Color del cielo?", "Azul."), ("pt", "Cor da neve?", "Branca.")],
    "6b7c": [("ru", "Столица России?", "Москва."), ("ru", "Сколько дней в неделе?", "Семь."),
             ("de", "Hauptstadt von Deutschland?", "Berlin."), ("ru", "Цвет неба?", "Синий."),
             ("ru", "Самая длинная река?", "Нил."), ("ru", "Сколько будет два плюс два?", "Четыре.")],
    "e8d5": [("de", "Wie viele Tage hat eine Woche?", "Sieben."), ("de", "Farbe des Schnees?", "Weiß."),
             ("de", "Größter Planet?", "Jupiter.")],  # no paper language: takes no part by default
}
PAPER_LANGUAGES = {"ar", "en", "es", "fr", "pt", "ru", "te", "zh"}
AYA_LANGUAGE = {"c9f1": "ar", "07ab": "en", "5e22": "te", "d410": "zh", "a003": "es", "6b7c": "ru"}  # es/pt tie: es


def aya_record(language, instruction, response):
    return {"instruction": instruction, "response": response, "language": language}


def write_fed_aya(root, clients=AYA_CLIENTS, name="aya_38c_25k.json"):
    """The released tree under ``root``: data/Fed-Aya/<name> plus a local/ file; returns data/Fed-Aya."""
    folder = root / "data" / "Fed-Aya"
    (folder / "local").mkdir(parents=True)
    data = {key: [aya_record(*r) for r in records] for key, records in clients.items()}
    (folder / name).write_text(json.dumps(data, ensure_ascii=False, indent=4), encoding="utf-8")
    local = [aya_record(*r) for r in clients.get("c9f1", [])]
    (folder / "local" / "local_ar.json").write_text(json.dumps(local, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture
def fed_aya(tmp_path):
    return write_fed_aya(tmp_path)


def ids(clients):
    return {c.client_id for c in clients}


def test_fed_aya_reads_the_released_file(fed_aya):
    data = load_dataset("fed-aya", path=str(fed_aya), unseen_clients=2, seed=0)
    assert data.name == "fed-aya" and data.task == "instruction" and data.labels == []
    everyone = data.seen + data.unseen
    assert len(data.unseen) == 2 and ids(data.seen).isdisjoint(ids(data.unseen))
    assert {c.client_id: c.language for c in everyone} == AYA_LANGUAGE  # e8d5 (German only) takes no part
    for client in everyone:
        kept = [(i, r) for language, i, r in AYA_CLIENTS[client.client_id] if language in PAPER_LANGUAGES]
        assert len(client.test) == math.ceil(0.2 * len(kept)) and len(client.train) == len(kept) - len(client.test)
        assert sorted((e["instruction"], e["response"]) for e in client.train + client.test) == sorted(kept)
    arabic = next(c for c in everyone if c.client_id == "c9f1")
    assert "ما هي عاصمة مصر؟" in {e["instruction"] for e in arabic.train + arabic.test}  # text kept as written
    assert data.info["source"].endswith("Fed-Aya/aya_38c_25k.json")


def test_fed_aya_path_may_be_the_file_its_folder_or_the_data_folder(fed_aya):
    found = [load_dataset("fed-aya", path=str(p), unseen_clients=2)
             for p in (fed_aya / "aya_38c_25k.json", fed_aya, fed_aya.parent)]
    assert all(ids(d.seen) == ids(found[0].seen) and ids(d.unseen) == ids(found[0].unseen) for d in found)


def test_fed_aya_unseen_clients_are_held_out_by_seed(fed_aya):
    draws = {seed: ids(load_dataset("fed-aya", path=str(fed_aya), unseen_clients=2, seed=seed).unseen)
             for seed in range(6)}
    assert all(len(unseen) == 2 for unseen in draws.values())
    assert ids(load_dataset("fed-aya", path=str(fed_aya), unseen_clients=2, seed=3).unseen) == draws[3]
    assert len({frozenset(u) for u in draws.values()}) > 1  # the seed decides which clients are unseen
    first = load_dataset("fed-aya", path=str(fed_aya), unseen_clients=2, seed=3)
    again = load_dataset("fed-aya", path=str(fed_aya), unseen_clients=2, seed=3)
    assert [c.test for c in first.seen] == [c.test for c in again.seen]


def test_fed_aya_unseen_clients_by_position_or_id(fed_aya):
    by_position = load_dataset("fed-aya", path=str(fed_aya), unseen_clients=[0, 2])  # as the paper's code does
    assert ids(by_position.unseen) == {"c9f1", "5e22"} and len(by_position.seen) == 4
    by_id = load_dataset("fed-aya", path=str(fed_aya), unseen_clients=["d410"])
    assert ids(by_id.unseen) == {"d410"}


def test_fed_aya_language_filter(fed_aya):
    data = load_dataset("fed-aya", path=str(fed_aya), languages="ar,te", unseen_clients=1)
    assert ids(data.seen + data.unseen) == {"c9f1", "5e22"}
    data = load_dataset("fed-aya", path=str(fed_aya), languages=["pt", "de"], unseen_clients=1)
    everyone = {c.client_id: c for c in data.seen + data.unseen}
    # 6b7c has a single German record, too few for a train and a test example, so it takes no part
    assert {k: c.language for k, c in everyone.items()} == {"a003": "pt", "e8d5": "de"}
    assert len(everyone["a003"].train + everyone["a003"].test) == 3  # its Spanish records are dropped
    with pytest.raises(FedP2EFTError, match=r"no record of .*aya_38c_25k.json has language\(s\) \['xx'\]"):
        load_dataset("fed-aya", path=str(fed_aya), languages="en,xx", unseen_clients=0)


def test_fed_aya_language_names_become_codes(tmp_path):
    names = {"Standard Arabic": "ar", "Simplified_Chinese": "zh", "English": "en"}
    clients = {f"k{i}": [(name, f"q{i}-{j}", f"a{i}-{j}") for j in range(3)] for i, name in enumerate(names)}
    data = load_dataset("fed-aya", path=str(write_fed_aya(tmp_path, clients)), unseen_clients=1)
    assert sorted(c.language for c in data.seen + data.unseen) == sorted(names.values())


def write_raw(tmp_path, text):
    folder = tmp_path / "Fed-Aya"
    folder.mkdir()
    (folder / "aya_38c_25k.json").write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("content, message", [
    ('{"c1": [{"instruction": "q", "response": "a"', r"aya_38c_25k.json is not valid UTF-8 JSON"),
    ('[{"instruction": "q", "response": "a", "language": "en"}]',
     r"aya_38c_25k.json must hold one JSON object mapping each client id to its list of records.*found list"),
    ('{}', r"must hold one JSON object .*found nothing"),
    ('{"c1": {"instruction": "q"}}', r"aya_38c_25k.json, client 'c1': expected a list of records, found dict"),
    ('{"c1": [{"instruction": "q", "response": "a", "language": "en"}, {"instruction": "q", "response": "a"}]}',
     r"aya_38c_25k.json, client 'c1', record 2: missing or empty \['language'\].*found keys \['instruction', "
     r"'response'\]"),
    ('{"c1": [{"inputs": "q", "targets": "a", "language": "en"}]}',
     r"client 'c1', record 1: missing or empty \['instruction', 'response'\]"),
    ('{"c1": [{"instruction": " ", "response": "a", "language": "en"}]}', r"missing or empty \['instruction'\]"),
    ('{"c1": ["just text"]}', r"client 'c1', record 1: expected an object with instruction, response, language"),
])
def test_fed_aya_bad_file_names_file_and_fault(tmp_path, content, message):
    with pytest.raises(FedP2EFTError, match=message):
        load_dataset("fed-aya", path=str(write_raw(tmp_path, content)))


def test_fed_aya_bad_paths_and_options(fed_aya, tmp_path):
    with pytest.raises(FedP2EFTError, match=r"fed-aya: no path given.*dataset_options.path=DIR.*FedLLM-Bench"):
        load_dataset("fed-aya")
    with pytest.raises(FedP2EFTError, match=r"fed-aya: .*nowhere does not exist"):
        load_dataset("fed-aya", path=str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FedP2EFTError, match=r"no aya_38c_25k.json in .*empty or in .*empty/Fed-Aya"):
        load_dataset("fed-aya", path=str(empty))
    with pytest.raises(FedP2EFTError, match=r"6 usable clients in .*aya_38c_25k.json .*unseen_clients=8"):
        load_dataset("fed-aya", path=str(fed_aya))  # the default holds out 8
    with pytest.raises(FedP2EFTError, match=r"unseen client 99 is not a usable client of .*positions 0..6"):
        load_dataset("fed-aya", path=str(fed_aya), unseen_clients=[99])
    with pytest.raises(FedP2EFTError, match=r"unseen client 'e8d5' is not a usable client"):
        load_dataset("fed-aya", path=str(fed_aya), unseen_clients=["e8d5"])  # no data in the paper languages
    with pytest.raises(FedP2EFTError, match=r"test_fraction must lie in \(0, 1\)"):
        load_dataset("fed-aya", path=str(fed_aya), test_fraction=1.5)
