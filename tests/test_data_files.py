"""Your own data: JSONL, CSV, Parquet files or folders, and the errors for bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedp2eft.cli import main
from fedp2eft.data.registry import load_dataset
from fedp2eft.errors import FedP2EFTError


def rows(languages=("en", "fr"), per_language=60, client=False, split=False):
    out = []
    for language in languages:
        for i in range(per_language):
            row = {"text": f"{language} sentence {i}", "label": ["pos", "neg", "neu"][i % 3], "language": language}
            if client:
                row["client"] = f"{language}-user{i % 4}"
            if split:
                row["split"] = "test" if i % 5 == 0 else "train"
            out.append(row)
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def test_jsonl_without_clients_is_partitioned_per_language(tmp_path):
    data = load_dataset(str(write_jsonl(tmp_path / "d.jsonl", rows())), clients_per_language=2, seed=3)
    assert data.task == "classification" and data.labels == ["neg", "neu", "pos"]
    assert len(data.seen) == len(data.unseen) == 4
    texts = [e["text"] for c in data.seen + data.unseen for e in c.train + c.test]
    assert len(texts) == len(set(texts))  # real data: no example used twice
    assert all(c.train and c.test for c in data.seen + data.unseen)


def test_csv_with_clients_and_split_keeps_clients(tmp_path):
    path = tmp_path / "d.csv"
    records = rows(client=True, split=True)
    path.write_text("text,label,language,client,split\n" + "".join(
        f"{r['text']},{r['label']},{r['language']},{r['client']},{r['split']}\n" for r in records))
    data = load_dataset(str(path), seed=0)
    clients = data.seen + data.unseen
    assert sorted(c.client_id for c in clients) == sorted({r["client"] for r in records})
    assert len(data.unseen) == 4  # half of each language's 4 clients
    en0 = next(c for c in clients if c.client_id == "en-user0")
    assert len(en0.train) + len(en0.test) == 15 and all(e["text"].startswith("en") for e in en0.train)


def test_parquet_folder_and_text_pair(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for language in ("de", "sw"):
        records = [{**r, "text_pair": "hyp"} for r in rows((language,), 40)]
        pq.write_table(pa.Table.from_pylist(records), folder / f"{language}.parquet")
    data = load_dataset(str(folder), clients_per_language=1, train_size=10, test_size=4)
    assert {c.language for c in data.seen} == {"de", "sw"}
    assert all(len(c.train) == 10 and c.train[0]["text_pair"] == "hyp" for c in data.seen)


def test_instruction_data(tmp_path):
    records = [{"instruction": f"q{i}", "response": f"a{i}", "language": "te", "client": f"c{i % 3}"}
               for i in range(30)]
    data = load_dataset(str(write_jsonl(tmp_path / "sft.jsonl", records)))
    assert data.task == "instruction" and data.labels == []
    assert set(data.seen[0].train[0]) == {"instruction", "response"}
    assert len(data.seen) + len(data.unseen) == 3


def test_missing_column_names_the_file(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "language": "en"}])
    with pytest.raises(FedP2EFTError, match=r"bad.jsonl: missing columns.*found \['language', 'text'\]"):
        load_dataset(str(path))
    path = write_jsonl(tmp_path / "nolang.jsonl", [{"text": "x", "label": "a"}])
    with pytest.raises(FedP2EFTError, match="missing column 'language'"):
        load_dataset(str(path))


def test_unknown_test_label_names_the_row(tmp_path):
    records = rows(("en",), 20, split=True)
    records.append({"text": "odd", "label": "surprise", "language": "en", "split": "test"})
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(FedP2EFTError, match=r"d.jsonl line 21: label 'surprise' appears in no train row"):
        load_dataset(str(path))


def test_too_little_data_names_the_language(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(("en",), 60) + rows(("ga",), 3))
    with pytest.raises(FedP2EFTError, match="language 'ga'"):
        load_dataset(str(path), clients_per_language=2)


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(FedP2EFTError, match="broken.parquet: cannot read it"):
        load_dataset(str(path))
    assert main(["data", "describe", str(path)]) == 2


def test_cli_describe_user_file(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", rows())
    assert main(["data", "describe", str(path), "--clients-per-language", "1"]) == 0
    out = capsys.readouterr().out
    assert "fr" in out and "pos" in out and "2 seen + 2 unseen" in out


def latin1_csv(folder):
    path = folder / "latin1.csv"
    path.write_bytes("text,label,language\nbonjour,pos,fr\ncafé crème,neg,fr\n".encode("latin-1"))
    return path, "latin1.csv line 3: not UTF-8 text"


def semicolon_csv(folder):
    path = folder / "semicolons.csv"
    path.write_text("text;label;language\nhello, world;pos;en\n")
    return path, "columns are separated by ';', not commas"


def unquoted_comma_csv(folder):
    path = folder / "commas.csv"
    path.write_text("text,label,language\nhello,pos,en\nhello, world,pos,en\n")
    return path, "commas.csv line 3: 4 fields where the header has 3; put text that holds commas in double quotes"


def empty_file(folder):
    path = folder / "empty.jsonl"
    path.write_text("")
    return path, "empty.jsonl: the file is empty"


def header_only_csv(folder):
    path = folder / "header.csv"
    path.write_text("text,label,language\n")
    return path, "header.csv: a header line but no rows"


def blank_first_line_csv(folder):
    path = folder / "blank.csv"
    path.write_text("\ntext,label,language\nhello,pos,en\n")
    return path, "blank.csv line 1: blank; a CSV file starts with its header line"


def broken_jsonl_line(folder):
    path = write_jsonl(folder / "broken.jsonl", rows(("en",), 3))
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:-5]
    path.write_text("\n".join(lines) + "\n")
    return path, "broken.jsonl line 2: not valid JSON"


def parquet_with_int_text(folder):
    path = folder / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2], "label": ["a", "b"], "language": ["en", "en"]}), path)
    return path, "numbers.parquet row 1: 'text' must be text, got int 1"


def parquet_with_float_labels(folder):
    path = folder / "floats.parquet"
    pq.write_table(pa.table({"text": ["x", "y"], "label": [1.0, 2.0], "language": ["en", "en"]}), path)
    return path, "floats.parquet row 1: 'label' must be text or a whole number (a name or an id), got float 1.0"


def folder_of_mixed_schemas(folder):
    data = folder / "mixed"
    data.mkdir()
    write_jsonl(data / "a.jsonl", rows(("en",), 10))
    write_jsonl(data / "b.jsonl", [{"instruction": "q", "response": "a", "language": "en"}])
    return data, "b.jsonl: columns ['instruction', 'language', 'response'] differ from those of"


@pytest.mark.parametrize("build", [latin1_csv, semicolon_csv, unquoted_comma_csv, empty_file, header_only_csv,
                                   blank_first_line_csv, broken_jsonl_line, parquet_with_int_text, parquet_with_float_labels,
                                   folder_of_mixed_schemas])
def test_a_bad_file_is_one_error_line_naming_it(tmp_path, capsys, build):
    path, message = build(tmp_path)
    assert main(["data", "describe", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedp2eft: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def test_integer_labels_and_client_ids_are_names(tmp_path):
    records = [{**r, "label": i % 3, "client": i % 4} for i, r in enumerate(rows(("en",), 40))]
    data = load_dataset(str(write_jsonl(tmp_path / "ids.jsonl", records)))
    assert data.labels == ["0", "1", "2"] and {c.client_id for c in data.seen + data.unseen} == {"0", "1", "2", "3"}


def test_a_pool_column_fixes_the_unseen_clients(tmp_path):
    records = [{**r, "pool": "unseen" if r["client"].endswith(("user1", "user3")) else "seen"}
               for r in rows(client=True, split=True)]
    data = load_dataset(str(write_jsonl(tmp_path / "pools.jsonl", records)), seed=5)
    assert sorted(c.client_id for c in data.unseen) == ["en-user1", "en-user3", "fr-user1", "fr-user3"]
    assert sorted(c.client_id for c in data.seen) == ["en-user0", "en-user2", "fr-user0", "fr-user2"]


@pytest.mark.parametrize("change, message", [
    (lambda r, i: {**r, "pool": "held-out"}, "pool must be 'seen' or 'unseen', got 'held-out'"),
    (lambda r, i: {**r, "pool": "seen" if i % 8 else "unseen"}, "a client is in one pool"),
    (lambda r, i: {k: v for k, v in r.items() if k != "client"} | {"pool": "seen"}, "needs a 'client' column"),
])
def test_a_bad_pool_column_is_named(tmp_path, change, message):
    records = [change(r, i) for i, r in enumerate(rows(client=True, split=True))]
    with pytest.raises(FedP2EFTError, match=message):
        load_dataset(str(write_jsonl(tmp_path / "bad.jsonl", records)))


def test_a_group_stays_on_one_side_of_the_test_and_the_validation_split(tmp_path):
    from fedp2eft.core.personalization import validation_split

    # each client's rows i, i+4, i+8 form a group: about 8 groups of 3 rows per client
    records = [{**r, "group": f"{r['client']}/{i // 12}"} for i, r in enumerate(rows(("en",), 96, client=True))]
    data = load_dataset(str(write_jsonl(tmp_path / "groups.jsonl", records)), seed=1)
    for client in data.seen + data.unseen:
        assert not {e["group"] for e in client.train} & {e["group"] for e in client.test}
        inner, validation = validation_split(client.train, 0.25, client.client_id)
        assert validation and not {e["group"] for e in inner} & {e["group"] for e in validation}
    assert all(isinstance(e["group"], str) for c in data.seen for e in c.train)  # names, as client ids are
