"""Sentences from ``home-assistant-intents`` templates (``data/intents.py``): a language's parsed templates with the
entity lists a real home fills at runtime present but empty, and a template's random realisations, walked by hand
because hassil's own sampler enumerates every combination."""

from __future__ import annotations

import re

import numpy as np

from fedp2eft.errors import FedP2EFTError

SAMPLE_TRIES = 40  # random draws per template; with max_per_template it bounds huge templates
RUNTIME_LISTS = ("name", "area", "floor")


def load_language_intents(language: str):
    """hassil Intents for ``language`` with runtime entity lists present but empty."""
    from hassil.intents import Intents, TextSlotList
    from home_assistant_intents import get_intents

    data = get_intents(language)
    if data is None:
        raise FedP2EFTError(f"intents: unknown language '{language}'")
    intents = Intents.from_dict(data)
    for list_name in RUNTIME_LISTS:
        intents.slot_lists.setdefault(list_name, TextSlotList(name=list_name, values=[]))
    return intents


def sample_sentence(expression, slot_lists: dict, rules: dict, language: str, rng: np.random.Generator) -> str | None:
    """One random realisation of a hassil expression, or None if every branch needs an empty list.

    hassil's own ``sample_expression`` enumerates the full cartesian product, which explodes for
    templates with number ranges; we walk the same parsed tree but choose at random.
    """
    from hassil.expression import Alternative, ListReference, Permutation, RuleReference, Sequence, TextChunk
    from hassil.intents import RangeSlotList, TextSlotList
    from hassil.numbers import get_rbnf_engine

    def walk(node) -> str | None:
        if isinstance(node, TextChunk):
            return node.original_text
        if isinstance(node, Alternative):
            for i in rng.permutation(len(node.items)):
                text = walk(node.items[i])
                if text is not None:
                    return text
            return None
        if isinstance(node, (Sequence, Permutation)):
            items = node.items
            if isinstance(node, Permutation):
                items = [items[i] for i in rng.permutation(len(items))]
            parts = [walk(item) for item in items]
            if any(p is None for p in parts):
                return None
            joiner = " " if isinstance(node, Permutation) else ""
            return joiner.join(parts)
        if isinstance(node, RuleReference):
            return walk(rules[node.rule_name].expression)
        if isinstance(node, ListReference):
            slot_list = slot_lists.get(node.list_name)
            if slot_list is None and node.is_inline_range:
                start, stop, step = node.get_inline_range()
                slot_list = RangeSlotList(name=None, start=start, stop=stop, step=step)
            if isinstance(slot_list, TextSlotList):
                return walk(slot_list.values[rng.integers(len(slot_list.values))].text_in) if slot_list.values else None
            if isinstance(slot_list, RangeSlotList):
                numbers = list(slot_list.get_numbers())
                number = numbers[rng.integers(len(numbers))]
                if slot_list.words and (not slot_list.digits or rng.random() < 0.5):
                    engine = get_rbnf_engine(slot_list.words_language or language)
                    words = sorted(set(engine.format_number(number).text_by_ruleset.values()))
                    return words[rng.integers(len(words))]
                return str(number)
            return None  # wildcards and unknown lists carry no native text
        raise FedP2EFTError(f"intents: unexpected template node {type(node).__name__}")

    return walk(expression)


def expand_template(sentence, slot_lists: dict, rules: dict, language: str, rng: np.random.Generator, cap: int) -> list[str]:
    """Up to ``cap`` distinct realisations of one template (SAMPLE_TRIES random draws)."""
    texts = set()
    for _ in range(SAMPLE_TRIES):
        try:
            text = sample_sentence(sentence.expression, slot_lists, rules, language, rng)
        except (ValueError, KeyError):  # no number words for this language, or a missing rule
            return []
        if text is None:
            return []
        texts.add(re.sub(r"\s+", " ", text).strip())
        if len(texts) >= cap:
            break
    return sorted(texts - {""})
