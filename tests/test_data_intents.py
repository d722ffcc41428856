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
        train = {t for by_intent in pools.train.values() for texts in by_intent.values() for t in texts}
        test = {t for texts in pools.test.values() for t in texts}
        assert train and test and train.isdisjoint(test)


def test_pools_split_train_templates_and_share_no_sentence():
    for language in ("en", "bn", "ga"):
        pools = language_pools(language, 1, 12, 0.34)
        templates = pools.templates
        assert templates["seen"] and templates["unseen"]
        assert templates["seen"].isdisjoint(templates["unseen"])
        assert templates["shared"].isdisjoint(templates["seen"] | templates["unseen"])
        assert templates["seen"] | templates["unseen"] | templates["shared"] == templates["train"]
        assert len(templates["shared"]) < len(templates["train"]) / 4  # mostly whole templates per pool
        for name in pools.test:
            seen, unseen = set(pools.train["seen"].get(name, [])), set(pools.train["unseen"].get(name, []))
            assert seen | unseen and seen.isdisjoint(unseen)
        sizes = [pools.n_train(pool) for pool in ("seen", "unseen")]
        assert min(sizes) >= 0.8 * max(sizes)  # balanced, so both pools can fill their clients


def train_texts(clients, language=None):
    return {e["text"] for c in clients if language in (None, c.language) for e in c.train}


def test_seen_and_unseen_clients_share_no_training_text(default):
    assert train_texts(default.seen) and train_texts(default.unseen)
    assert train_texts(default.seen).isdisjoint(train_texts(default.unseen))
    counts = default.info["train_sentences"]
    assert set(counts) == set(DEFAULT_LANGUAGES)
    assert all(min(n.values()) >= 48 for n in counts.values())


def test_more_clients_and_larger_tests_build_for_the_default_languages():
    data = load_dataset("intents", clients_per_language=4, test_size=48, seed=2, cache=False)
    for pool in (data.seen, data.unseen):
        assert Counter(c.language for c in pool) == {lang: 4 for lang in DEFAULT_LANGUAGES}
    assert all(len(c.train) == 48 and len(c.test) == 48 for c in data.seen + data.unseen)
    for language in DEFAULT_LANGUAGES:
        assert train_texts(data.seen, language).isdisjoint(train_texts(data.unseen, language))
    assert train_texts(data.seen).isdisjoint(train_texts(data.unseen))


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
