"""The embedded home-assistant-intents benchmark."""

import re
from collections import Counter

import pytest

from fedp2eft.cli import main
from fedp2eft.data.intents import DEFAULT_LANGUAGES, language_pools
from fedp2eft.data.registry import dataset_names, load_dataset
from fedp2eft.errors import FedP2EFTError

LOW_RESOURCE = {"ne", "cy", "ga", "bn", "ml"}


@pytest.fixture(scope="module")
def default():
    return load_dataset("intents")


def test_default_shape(default):
    languages = {c.language for c in default.seen}
    assert languages == set(DEFAULT_LANGUAGES) and LOW_RESOURCE <= languages
    assert 10 <= len(languages) <= 16
    for pool in (default.seen, default.unseen):
        assert Counter(c.language for c in pool) == {lang: 2 for lang in languages}
    assert {c.client_id for c in default.seen}.isdisjoint({c.client_id for c in default.unseen})
    for client in default.seen + default.unseen:
        assert len(client.train) == 48 and len(client.test) == 24
        train_labels = {e["label"] for e in client.train}
        assert {e["label"] for e in client.test} <= train_labels
        assert all(0 <= e["label"] < len(default.labels) for e in client.train)
    assert all(name.startswith("Hass") for name in default.labels)


def test_labels_are_shared_and_skewed(default):
    per_label_languages = Counter()
    for label in range(len(default.labels)):
        per_label_languages[label] = len({c.language for c in default.seen + default.unseen
                                          if any(e["label"] == label for e in c.train + c.test)})
    assert min(per_label_languages.values()) >= 1
    label_sets = {frozenset(e["label"] for e in c.train) for c in default.seen if c.language == "en"}
    distributions = [Counter(e["label"] for e in c.train).most_common(1)[0][1] for c in default.seen]
    assert max(distributions) >= 8  # Dirichlet(0.5) concentrates some clients on a few intents
    assert len(label_sets) == 2


def test_train_and_test_come_from_different_templates():
    for language in ("en", "cy", "zh-CN"):
        pools = language_pools(language, 0, 12, 0.34)
        assert pools.templates["train"] and pools.templates["test"]
        assert pools.templates["train"].isdisjoint(pools.templates["test"])
        train = {t for texts in pools.train.values() for t in texts}
        test = {t for texts in pools.test.values() for t in texts}
        assert train.isdisjoint(test)


def test_sentences_are_native_text_without_placeholders(default):
    for client in default.seen + default.unseen:
        for example in client.train + client.test:
            assert example["text"] and not re.search(r"[{}<>\[\]]", example["text"])
    hindi = " ".join(e["text"] for c in default.seen if c.language == "hi" for e in c.train)
    assert re.search(r"[\u0900-\u097F]", hindi)
    assert not re.search(r"\b(area|name|floor|kitchen)\b", hindi)


def test_deterministic_cached_and_seeded(default, fedp2eft_cache):
    assert [c.train for c in load_dataset("intents").seen] == [c.train for c in default.seen]
    manifests = list((fedp2eft_cache / "data" / "intents").glob("*/manifest.json"))
    assert manifests and all((m.parent / "data.parquet").is_file() for m in manifests)
    rebuilt = load_dataset("intents", cache=False)
    assert [c.test for c in rebuilt.unseen] == [c.test for c in default.unseen]
    other = load_dataset("intents", seed=1, languages=["en", "cy"], cache=False)
    assert [c.train for c in other.seen][:2] != [c.train for c in default.seen if c.language in ("en", "cy")][:2]


def test_options_and_all_languages():
    small = load_dataset("intents", languages="en,ne", clients_per_language=3, train_size=20, test_size=10, alpha=5.0)
    assert len(small.seen) == len(small.unseen) == 6
    assert {len(c.train) for c in small.seen} == {20}
    every = load_dataset("intents", languages="all", clients_per_language=1)
    assert len({c.language for c in every.seen}) >= 40
    assert "sw" not in {c.language for c in every.seen}


def test_language_without_enough_data_is_named():
    with pytest.raises(FedP2EFTError, match="language 'sw' has too little data"):
        load_dataset("intents", languages=["en", "sw"])
    with pytest.raises(FedP2EFTError, match="unknown language 'xx'"):
        load_dataset("intents", languages=["xx"])
    with pytest.raises(FedP2EFTError, match="unknown option"):
        load_dataset("intents", clients=3)


def test_cli_describe(capsys):
    assert "intents" in dataset_names()
    assert main(["data", "describe", "intents", "--languages", "en,cy", "--train-size", "16", "--test-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "cy" in out and "HassTurnOn" in out and "4 seen + 4 unseen" in out
    assert main(["data", "describe", "intents", "--languages", "sw"]) == 2
    assert "sw" in capsys.readouterr().err
