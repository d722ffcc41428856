"""Readers for a user's data files: CSV and JSON Lines with the standard library, Parquet with pyarrow.

The text formats are read line by line so that every error names the line a user opens in an editor, and their
values stay as written (a CSV cell is text), so no column changes type halfway through a file. Each reader returns
``(where, record)`` pairs, ``where`` being the line or row a record came from.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fedp2eft.errors import FedP2EFTError

Located = list[tuple[str, dict]]


def read_text(file: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark is dropped). Another encoding is an error naming the
    line: decoding it as something else would turn the text into garbage without a word."""
    data = file.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise FedP2EFTError(
            f"{file} line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as UTF-8, e.g. "
            f"iconv -f latin1 -t utf-8 {file.name} > utf8-{file.name}"
        ) from error


def read_csv(file: Path) -> Located:
    """Comma-separated, a header line first, text in double quotes where it holds commas."""
    reader = csv.reader(io.StringIO(read_text(file), newline=""))
    try:
        header = next(reader, [])
        check_header(file, header)
        records = []
        for cells in reader:
            if not cells:  # a blank line
                continue
            if len(cells) != len(header):
                raise FedP2EFTError(f"{file} line {reader.line_num}: {len(cells)} fields where the header has "
                                    f"{len(header)}; put text that holds commas in double quotes")
            records.append((f"line {reader.line_num}", dict(zip(header, cells))))
    except csv.Error as error:
        raise FedP2EFTError(f"{file} line {reader.line_num}: not valid CSV ({error})") from error
    if not records:
        raise FedP2EFTError(f"{file}: a header line but no rows; add rows or remove the file")
    return records


def check_header(file: Path, header: list[str]) -> None:
    """The first line names the columns; one column that holds ``;`` or a tab is a file with another separator."""
    if not header:
        raise FedP2EFTError(f"{file} line 1: blank; a CSV file starts with its header line, e.g. text,label,language")
    if len(header) == 1:
        separator = next((s for s in (";", "\t", "|") if s in header[0]), None)
        if separator is not None:
            raise FedP2EFTError(f"{file}: columns are separated by {separator!r}, not commas (header "
                                f"{header[0]!r}); save it as comma-separated CSV")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise FedP2EFTError(f"{file}: column(s) {repeated} appear more than once in the header")


def read_jsonl(file: Path) -> Located:
    """One JSON object per line; blank lines are skipped."""
    records = []
    for number, line in enumerate(read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise FedP2EFTError(f"{file} line {number}: not valid JSON ({error.msg}, column {error.colno}); each "
                                f"line must hold one JSON object") from error
        if not isinstance(record, dict):
            raise FedP2EFTError(f"{file} line {number}: a JSON {type(record).__name__} where a JSON object "
                                f'({{"text": ..., ...}}) is expected; each line holds one record')
        records.append((f"line {number}", record))
    return records


def read_parquet(file: Path) -> Located:
    try:
        table: pa.Table = pq.read_table(file)
    except (OSError, pa.ArrowException) as error:
        raise FedP2EFTError(f"{file}: cannot read it as Parquet ({error})") from error
    return [(f"row {number}", record) for number, record in enumerate(table.to_pylist(), start=1)]


READERS = {".jsonl": read_jsonl, ".json": read_jsonl, ".csv": read_csv, ".parquet": read_parquet}


def read_records(file: Path) -> Located:
    """The records of one file of a supported type, every one with the same columns (a key a JSON line lacks is
    None there); an empty file, or one without records, is an error."""
    reader = READERS.get(file.suffix.lower())
    if reader is None:
        raise FedP2EFTError(f"{file}: unsupported file type '{file.suffix}'; use JSONL, CSV or Parquet")
    if file.stat().st_size == 0:
        raise FedP2EFTError(f"{file}: the file is empty; add rows or remove the file")
    records = reader(file)
    if not records:
        raise FedP2EFTError(f"{file}: no records; add rows or remove the file")
    columns = list(dict.fromkeys(key for _, record in records for key in record))
    return [(where, {column: record.get(column) for column in columns}) for where, record in records]
