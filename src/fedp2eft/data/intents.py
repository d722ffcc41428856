"""The embedded benchmark: federated multilingual intent classification from ``home-assistant-intents``.

Native speakers wrote, per language, sentence templates for a shared set of intents; ``hassil``
expands them. Train and test sentences come from disjoint templates, so the test measures
generalisation to unseen phrasings. The entity lists ``name``/``area``/``floor`` are filled at
runtime from a user's home and are not in the package: we give them no values, so hassil keeps only
the expansions that do not need them and no English placeholder enters a non-English sentence.
Templates with wildcards (free text such as a shopping item) are skipped for the same reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib.metadata import version

import numpy as np

from fedp2eft.data.cache import cached
from fedp2eft.data.partition import partition_language, split_pools
from fedp2eft.data.types import FederatedDataset
from fedp2eft.errors import FedP2EFTError

# 12 languages, 9 scripts: five well-resourced anchors, Thai, Hindi and five low-resource languages.
# Swahili is not among them: this release has 3 intents and 7 usable sentences for it (docs/data.md).
DEFAULT_LANGUAGES = ["en", "es", "ru", "zh-CN", "ar", "th", "hi", "ne", "ml", "cy", "ga", "bn"]
DEFAULTS = dict(
    seed=0,
    clients_per_language=2,
    train_size=48,
    test_size=24,
    alpha=0.5,
    min_labels=3,
    max_per_template=12,
    test_template_fraction=0.34,
)
SAMPLE_TRIES = 40  # random draws per template; with max_per_template it bounds huge templates
RUNTIME_LISTS = ("name", "area", "floor")
BUILD_VERSION = 2  # bump when the construction changes, so cached builds are not reused


@dataclass
class LanguagePools:
    """Expanded sentences of one language, split by template into train and test pools per intent."""

    language: str
    train: dict[str, list[str]]
    test: dict[str, list[str]]
    templates: dict[str, set[str]] = field(default_factory=lambda: {"train": set(), "test": set()})

    def n_train(self) -> int:
        return sum(len(v) for v in self.train.values())


def available_languages() -> list[str]:
    from home_assistant_intents import get_languages

    return sorted(get_languages())


def _load_intents(language: str):
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


def _sample(expression, slot_lists: dict, rules: dict, language: str, rng: np.random.Generator) -> str | None:
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


def _expand(sentence, slot_lists: dict, rules: dict, language: str, rng: np.random.Generator, cap: int) -> list[str]:
    """Up to ``cap`` distinct realisations of one template (SAMPLE_TRIES random draws)."""
    texts = set()
    for _ in range(SAMPLE_TRIES):
        try:
            text = _sample(sentence.expression, slot_lists, rules, language, rng)
        except (ValueError, KeyError):  # no number words for this language, or a missing rule
            return []
        if text is None:
            return []
        texts.add(re.sub(r"\s+", " ", text).strip())
        if len(texts) >= cap:
            break
    return sorted(texts - {""})


def language_pools(language: str, seed: int, max_per_template: int, test_template_fraction: float) -> LanguagePools:
    """Expand every usable template and assign whole templates to train or test per intent."""
    intents = _load_intents(language)
    rng = np.random.default_rng([seed, sum(map(ord, language))])
    train: dict[str, set[str]] = {}
    test: dict[str, set[str]] = {}
    used: dict[str, set[str]] = {"train": set(), "test": set()}  # template sources per side
    for name in sorted(intents.intents):
        merged: dict[str, set[str]] = {}  # one template text may appear in several data blocks
        for data in intents.intents[name].data:
            rules = {**intents.expansion_rules, **data.expansion_rules}
            for sentence in data.sentences:
                if any(n in data.wildcard_list_names for n in sentence.list_names(rules)):
                    continue
                texts = _expand(sentence, intents.slot_lists, rules, language, rng, max_per_template)
                if texts:
                    merged.setdefault(sentence.text, set()).update(texts)
        templates = sorted(merged.items())
        if len(templates) < 2:
            continue  # a template cannot be on both sides, so the intent needs two
        order = rng.permutation(len(templates))
        n_test = max(1, min(len(templates) - 1, round(len(templates) * test_template_fraction)))
        train[name] = {t for i in order[n_test:] for t in templates[i][1]}
        test[name] = {t for i in order[:n_test] for t in templates[i][1]} - train[name]
        used["train"] |= {templates[i][0] for i in order[n_test:]}
        used["test"] |= {templates[i][0] for i in order[:n_test]}
    # A sentence that several intents produce has no single true label: drop it everywhere.
    owners: dict[str, int] = {}
    for name in train:
        for text in train[name] | test[name]:
            owners[text] = owners.get(text, 0) + 1
    keep = [n for n in sorted(train) if any(owners[t] == 1 for t in train[n]) and any(owners[t] == 1 for t in test[n])]
    return LanguagePools(
        language,
        {n: sorted(t for t in train[n] if owners[t] == 1) for n in keep},
        {n: sorted(t for t in test[n] if owners[t] == 1) for n in keep},
        used,
    )


def _shared(all_pools: list[LanguagePools]) -> list[LanguagePools]:
    """Keep the intents that at least two of the languages cover (all of them for one language)."""
    counts: dict[str, int] = {}
    for pools in all_pools:
        for name in pools.train:
            counts[name] = counts.get(name, 0) + 1
    keep = {n for n, c in counts.items() if c >= 2 or len(all_pools) == 1}
    return [
        LanguagePools(p.language, {n: t for n, t in p.train.items() if n in keep},
                      {n: t for n, t in p.test.items() if n in keep}, p.templates)
        for p in all_pools
    ]


def _select_languages(languages, options: dict) -> tuple[list[LanguagePools], dict[str, str]]:
    """Pools of the requested languages; with ``"all"`` or the default list, silently keep those
    with enough data (the others are returned with the reason); a language named explicitly that
    lacks data is an error."""
    explicit = languages not in (None, "all")
    names = DEFAULT_LANGUAGES if languages is None else available_languages() if languages == "all" else list(languages)
    known = set(available_languages())
    for language in names:
        if language not in known:
            raise FedP2EFTError(f"intents: unknown language '{language}'; available: {', '.join(sorted(known))}")
    all_pools = _shared([
        language_pools(n, options["seed"], options["max_per_template"], options["test_template_fraction"])
        for n in names
    ])
    min_examples = options["min_examples"] or options["train_size"]
    chosen, skipped = [], {}
    for pools in all_pools:
        problem = None
        if len(pools.train) < options["min_labels"]:
            problem = (f"{len(pools.train)} shared intents with templates on both sides "
                       f"(min_labels={options['min_labels']})")
        elif pools.n_train() < min_examples:
            problem = f"{pools.n_train()} distinct train sentences (min_examples={min_examples})"
        if problem is None:
            chosen.append(pools)
            continue
        skipped[pools.language] = problem
        if explicit:
            raise FedP2EFTError(
                f"intents: language '{pools.language}' has too little data: {problem}; drop it or lower the limit"
            )
    if not chosen:
        raise FedP2EFTError("intents: no language has enough data for these options")
    return chosen, skipped


def _examples(by_intent: dict[str, list[str]], index: dict[str, int]) -> dict[int, list[dict]]:
    return {index[n]: [{"text": t, "label": index[n]} for t in texts] for n, texts in by_intent.items()}


def build_intents(options: dict) -> FederatedDataset:
    """Build the benchmark from scratch (deterministic in ``options``)."""
    all_pools, skipped = _select_languages(options["languages"], options)
    labels = sorted({name for pools in all_pools for name in pools.train})
    index = {name: i for i, name in enumerate(labels)}
    rng = np.random.default_rng(options["seed"])
    seen, unseen = [], []
    k = options["clients_per_language"]
    for pools in all_pools:
        ids = [f"{pools.language}-{pool}{i}" for pool in ("s", "u") for i in range(k)]
        clients = partition_language(
            pools.language, _examples(pools.train, index), _examples(pools.test, index), ids,
            options["train_size"], options["test_size"], options["alpha"], rng, disjoint=False,
        )
        pool_seen, pool_unseen = split_pools(clients, k)
        seen += pool_seen
        unseen += pool_unseen
    info = {
        "source": f"home-assistant-intents=={version('home-assistant-intents')}",
        "options": options,
        "languages": [p.language for p in all_pools],
        "skipped_languages": skipped,
        "templates": {p.language: {side: len(t) for side, t in p.templates.items()} for p in all_pools},
    }
    return FederatedDataset("intents", "classification", labels, seen, unseen, info)


def load_intents(**options) -> FederatedDataset:
    """The embedded benchmark, built once per option set and then read from the parquet cache."""
    unknown = set(options) - set(DEFAULTS) - {"languages", "min_examples", "cache"}
    if unknown:
        known = sorted([*DEFAULTS, "languages", "min_examples", "cache"])
        raise FedP2EFTError(f"intents: unknown option(s) {sorted(unknown)}; known: {known}")
    use_cache = options.pop("cache", True)
    merged = {**DEFAULTS, "languages": None, "min_examples": None, **options}
    if isinstance(merged["languages"], str) and merged["languages"] != "all":
        merged["languages"] = [x.strip() for x in merged["languages"].split(",") if x.strip()]
    if min(merged["clients_per_language"], merged["train_size"], merged["test_size"]) < 1 or merged["alpha"] <= 0:
        raise FedP2EFTError("intents: clients_per_language, train_size, test_size must be >= 1 and alpha > 0")
    versions = {"build": BUILD_VERSION, "package": version("home-assistant-intents"), "hassil": version("hassil")}
    key = json.dumps({**merged, **versions}, sort_keys=True)
    if not use_cache:
        return build_intents(merged)
    return cached("intents", key, lambda: build_intents(merged))
