"""The embedded instruction benchmark: user sentences of home-assistant-intents with the assistant's native reply."""

import re
from collections import Counter

import pytest

from fedp2eft.data.intents import CHAT_LANGUAGES, language_pools, plain_replies, reply_labeling
from fedp2eft.data.registry import dataset_names, load_dataset
from fedp2eft.errors import FedP2EFTError

# One character class per script the default languages are written in (Latin for en/es/cy).
SCRIPTS = {"ru": r"[\u0400-\u04FF]", "zh-CN": r"[\u4E00-\u9FFF]", "ar": r"[\u0600-\u06FF]", "th": r"[\u0E00-\u0E7F]",
           "hi": r"[\u0900-\u097F]", "el": r"[\u0370-\u03FF]", "ml": r"[\u0D00-\u0D7F]"}


@pytest.fixture(scope="module")
def chat():
    return load_dataset("intents-chat")


def test_default_shape_eight_scripts_and_instruction_examples(chat):
    assert "intents-chat" in dataset_names() and chat.task == "instruction" and chat.labels == []
    languages = {c.language for c in chat.seen}
    assert languages == set(CHAT_LANGUAGES) and len(languages) >= 8 and len(SCRIPTS) + 1 >= 8
    for pool in (chat.seen, chat.unseen):
        assert Counter(c.language for c in pool) == {language: 2 for language in languages}
    for client in chat.seen + chat.unseen:
        assert len(client.train) == 48 and len(client.test) == 24
        for example in client.train + client.test:
            assert set(example) == {"instruction", "response"} and example["instruction"] and example["response"]


def test_responses_are_the_clients_own_language(chat):
    for client in chat.seen + chat.unseen:
        replies = set(plain_replies(client.language).values())
        assert all(e["response"] in replies for e in client.train + client.test)
        if client.language in SCRIPTS:
            script = re.compile(SCRIPTS[client.language])
            # native authors sometimes answer in Latin letters (Greek "ok"): the script still dominates
            share = sum(bool(script.search(e["response"])) for e in client.train + client.test) / 72
            assert share >= 0.9, client.client_id


def test_replies_are_plain_text_never_templates():
    for language in CHAT_LANGUAGES:
        replies = plain_replies(language)
        assert len(replies) >= 10
        assert not any("{{" in text or "{%" in text or not text.strip() for text in replies.values())


def test_train_and_test_come_from_different_templates_and_pools_share_nothing():
    pools = language_pools("de", seed=0, max_per_template=12, test_template_fraction=0.34,
                           label_of=reply_labeling("de"))
    assert pools.templates["train"].isdisjoint(pools.templates["test"])
    assert pools.templates["seen"].isdisjoint(pools.templates["unseen"])
    assert all(":" in label for label in pools.test)  # (intent, reply) labels
    for label, sentences in pools.test.items():
        for pool in ("seen", "unseen"):
            assert set(sentences).isdisjoint(pools.train[pool].get(label, []))
    seen = {t for texts in pools.train["seen"].values() for t in texts}
    unseen = {t for texts in pools.train["unseen"].values() for t in texts}
    assert seen and unseen and seen.isdisjoint(unseen)


def test_seen_and_unseen_clients_share_no_training_instruction(chat):
    for language in CHAT_LANGUAGES:
        seen = {e["instruction"] for c in chat.seen if c.language == language for e in c.train}
        unseen = {e["instruction"] for c in chat.unseen if c.language == language for e in c.train}
        assert seen.isdisjoint(unseen), language


def test_clients_are_skewed_over_replies(chat):
    counts = [Counter(e["response"] for e in c.train) for c in chat.seen if c.language == "en"]
    assert counts[0] != counts[1]
    assert max(max(c.values()) for c in counts) >= 6  # Dirichlet(0.5): some reply dominates a client


def test_options_and_bad_language():
    small = load_dataset("intents-chat", languages="en,zh-CN", clients_per_language=1, train_size=16, test_size=8,
                         cache=False)
    assert [c.client_id for c in small.seen] == ["en-s0", "zh-CN-s0"]
    with pytest.raises(FedP2EFTError, match="intents-chat: unknown language 'xx'"):
        load_dataset("intents-chat", languages=["xx"])
    with pytest.raises(FedP2EFTError, match="intents-chat: unknown option"):
        load_dataset("intents-chat", colour="blue")
