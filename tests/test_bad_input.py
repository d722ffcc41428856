"""Bad input, counted: damaged and mismatched checkpoints and generator files, corrupted run folders and malformed
configs each end the command with exit status 2 and one ``fedp2eft: error:`` line that names the problem (no
traceback), and leave the good parts of a run folder as they were. docs/federation.md ("What we promise") lists
what is tried here."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from conftest import bert_config, classifier_from_config, make_tokenizer
from fedp2eft.cli import main
from fedp2eft.core.modeling import HEAD_FILE
from test_data_files import rows, write_jsonl


def files_digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny classifier checkpoint (encoder, head and labels, tokenizer) for the labels of ``data``."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer = make_tokenizer()
    classifier_from_config(bert_config(len(tokenizer)), sorted({r["label"] for r in rows()})).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", rows())


@pytest.fixture
def small_run(quick_run, tmp_path) -> Path:
    """The quick run's folder without its model weights (the report reads module shapes from the configured model
    when the base checkpoint is gone), so that a test may damage it."""
    copy = tmp_path / "run"
    shutil.copytree(quick_run, copy, ignore=shutil.ignore_patterns("*.safetensors", "model", "clients", "tensorboard"))
    return copy


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """Run the command; it must fail with status 2 and print exactly one error line containing ``fragments``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedp2eft: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err
    return lines[0]


def personalize_words(model: Path, data: Path) -> list[str]:
    return ["personalize", "--model", str(model), "--data", str(data), "--client", "en-u0", "--method", "lora",
            "--budget", "2"]


@pytest.mark.parametrize("damaged", ["model.safetensors", HEAD_FILE])
def test_a_truncated_checkpoint_file_is_named(checkpoint, data, tmp_path, capsys, damaged):
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    truncate(model / damaged)
    refused(capsys, personalize_words(model, data), str(model), "damaged")


def test_a_generator_of_another_rank_or_model_is_refused(quick_run, checkpoint, data, tmp_path, capsys):
    generator = quick_run / "seed0" / "psg" / "generator.safetensors"
    words = ["personalize", "--run", str(quick_run), "--client", "en-u0", "--method", "fedp2eft", "--budget", "2",
             "--artifact", str(generator)]
    refused(capsys, [*words, "--max-rank", "4"], "does not fit")
    refused(capsys, [*personalize_words(checkpoint, data)[:-4], "--method", "fedp2eft", "--budget", "2",
                     "--artifact", str(generator)], "does not fit")
    cut = tmp_path / "generator.safetensors"
    shutil.copy(generator, cut)
    truncate(cut)
    refused(capsys, [*words[:-1], str(cut)], str(cut), "not a safetensors file")


def test_a_corrupted_results_file_is_refused_and_left_as_it_was(small_run, capsys):
    assert main(["report", str(small_run)]) == 0  # the copy itself is a good run folder
    capsys.readouterr()
    results = small_run / "personalize.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join([lines[0][: len(lines[0]) // 2] + "\n", *lines[1:]]))
    before = files_digest(small_run)
    refused(capsys, ["report", str(small_run)], "personalize.jsonl line 1 is corrupt")
    assert files_digest(small_run) == before


def test_a_folder_without_its_config_is_not_taken_for_a_run(small_run, capsys):
    (small_run / "config.yaml").unlink()
    before = files_digest(small_run)
    refused(capsys, ["report", str(small_run)], "not a benchmark run folder")
    refused(capsys, ["personalize", "--run", str(small_run), "--client", "en-u0", "--method", "lora"],
            "not a benchmark run folder")
    assert files_digest(small_run) == before


def test_a_stage_folder_from_another_config_is_not_reused(small_run, capsys):
    before = files_digest(small_run)
    refused(capsys, ["benchmark", "--config", "quick", "--results", str(small_run.parent), "name=run",
                     "psg.rounds=3"], "another config", "psg")
    assert files_digest(small_run) == before


@pytest.mark.parametrize("text, fragments", [
    ("profile: quick\nbudgets: [2, 8\n", ("is not valid YAML", "line 3")),
    ("profile: quick\nbudgets: two\n", ("budgets",)),
    ("profile: quick\nno_such_key: 1\n", ("no_such_key",)),
    ("profile: nowhere\n", ("nowhere",)),
    ("- a list\n- not a mapping\n", ("must be a YAML mapping",)),
])
def test_a_malformed_config_file_is_refused_before_any_work(tmp_path, capsys, text, fragments):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    refused(capsys, ["benchmark", "--config", str(config), "--results", str(tmp_path / "results")], *fragments)
    assert not (tmp_path / "results").exists()
