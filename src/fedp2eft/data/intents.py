"""The embedded benchmark: federated multilingual intent classification from ``home-assistant-intents``.

Native speakers wrote, per language, sentence templates for a shared set of intents; ``hassil``
expands them. Train and test sentences come from disjoint templates, so the test measures
generalisation to unseen phrasings. The entity lists ``name``/``area``/``floor`` are filled at
runtime from a user's home and are not in the package: we give them no values, so hassil keeps only
the expansions that do not need them and no English placeholder enters a non-English sentence.
Templates with wildcards (free text such as a shopping item) are skipped for the same reason.

Seen and unseen clients never share a training sentence: the train templates of every intent are
split between the two pools before clients are drawn (docs/data.md, section "Pools").

``intents-chat`` is the instruction-tuning twin (docs/data.md, "The embedded instruction benchmark"): the same
user sentences, each paired with the reply the assistant gives in that language. Native speakers wrote those replies
next to the templates; a template block names its reply, so the label is (intent, reply) and the response is that
reply's text. Only replies that are plain text are used (a reply that is a Jinja template needs the state of a
real home to render).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import version
from typing import Any

import numpy as np

from fedp2eft.data.cache import cached
from fedp2eft.data.hassil_templates import expand_template, load_language_intents
from fedp2eft.data.partition import partition_language
from fedp2eft.data.types import FederatedDataset, TaskKind
from fedp2eft.errors import FedP2EFTError

# 12 languages, 9 scripts: five well-resourced anchors, Thai, Hindi and five low-resource languages.
# Swahili is not among them: this release has 3 intents and 7 usable sentences for it (docs/data.md).
DEFAULT_LANGUAGES = ["en", "es", "ru", "zh-CN", "ar", "th", "hi", "ne", "ml", "cy", "ga", "bn"]
# intents-chat: ten languages, eight scripts, with enough plain-text replies (docs/data.md).
CHAT_LANGUAGES = ["en", "es", "ru", "zh-CN", "ar", "th", "hi", "el", "ml", "cy"]
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
BUILD_VERSION = 3  # bump when the construction changes, so cached builds are not reused
LabelOf = Callable[[str, Any], "str | None"]  # (intent name, hassil IntentData) -> label, or None to skip the block
POOLS = ("seen", "unseen")
TEMPLATE_SIDES = ("train", "test", "seen", "unseen", "shared")


@dataclass
class LanguagePools:
    """Expanded sentences of one language per intent: a test side split off by template, and a train
    side split between the seen and unseen client pools so that the two never share a sentence.

    ``train`` maps pool -> intent -> sentences. ``templates`` holds the template sources per side:
    ``train``/``test``, the whole templates of each pool (``seen``/``unseen``), and ``shared``, the
    templates of intents with a single train template, whose sentences are split between the pools.
    """

    language: str
    train: dict[str, dict[str, list[str]]]
    test: dict[str, list[str]]
    templates: dict[str, set[str]] = field(default_factory=lambda: {k: set() for k in TEMPLATE_SIDES})

    def n_train(self, pool: str) -> int:
        return sum(len(v) for v in self.train[pool].values())

    def restrict(self, keep: set[str]) -> LanguagePools:
        """The same pools with only the intents in ``keep``."""
        train = {pool: {n: t for n, t in by.items() if n in keep} for pool, by in self.train.items()}
        return LanguagePools(self.language, train, {n: t for n, t in self.test.items() if n in keep}, self.templates)


def available_languages() -> list[str]:
    from home_assistant_intents import get_languages

    return sorted(get_languages())


def _split_between_pools(
    templates: list[tuple[str, list[str]]], totals: dict[str, int], rng: np.random.Generator
) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """Sentences (and template sources) of one intent's train templates for each pool.

    Whole templates go to one pool, so unseen clients also meet phrasings the base model never saw:
    shuffled, each goes to the pool with fewer sentences of this intent so far, ties to the pool with
    fewer sentences in the language (``totals``, updated here), which keeps the pools balanced. An
    intent with a single train template cannot be split that way: its sentences are split in half
    instead (the template is then ``shared``), so both pools keep the intent (unless it has one sentence).
    """
    texts: dict[str, set[str]] = {pool: set() for pool in POOLS}
    chosen: dict[str, set[str]] = {pool: set() for pool in POOLS}
    if len(templates) == 1:
        source, sentences = templates[0]
        order = rng.permutation(len(sentences))
        first, second = sorted(POOLS, key=lambda p: totals[p])
        texts[first] = {sentences[i] for i in order[: (len(sentences) + 1) // 2]}
        texts[second] = {sentences[i] for i in order[(len(sentences) + 1) // 2 :]}
    else:
        for i in rng.permutation(len(templates)):
            pool = min(POOLS, key=lambda p: (len(texts[p]), totals[p]))
            chosen[pool].add(templates[i][0])
            texts[pool].update(templates[i][1])
        texts["unseen"] -= texts["seen"]  # two templates can yield the same sentence: it stays seen only
    for pool in POOLS:
        totals[pool] += len(texts[pool])
    shared = {templates[0][0]} if len(templates) == 1 else set()
    return {pool: sorted(texts[pool]) for pool in POOLS}, {**chosen, "shared": shared}


def intent_label(name: str, data: Any) -> str:
    """The classification label of a template block: its intent."""
    return name


def language_pools(language: str, seed: int, max_per_template: int, test_template_fraction: float,
                   label_of: LabelOf = intent_label) -> LanguagePools:
    """Expand every usable template, assign whole templates to train or test per label (``label_of``: the
    intent, or (intent, reply) for intents-chat), then split each label's train side between the seen and
    unseen pools (``_split_between_pools``)."""
    intents = load_language_intents(language)
    rng = np.random.default_rng([seed, sum(map(ord, language))])
    train: dict[str, list[tuple[str, set[str]]]] = {}  # label -> (template source, sentences)
    test: dict[str, tuple[set[str], set[str]]] = {}  # label -> (template sources, sentences)
    for name in sorted(intents.intents):
        merged: dict[str, dict[str, set[str]]] = {}  # label -> template text (in several blocks) -> sentences
        for data in intents.intents[name].data:
            label = label_of(name, data)
            if label is None:
                continue
            rules = {**intents.expansion_rules, **data.expansion_rules}
            for sentence in data.sentences:
                if any(n in data.wildcard_list_names for n in sentence.list_names(rules)):
                    continue
                texts = expand_template(sentence, intents.slot_lists, rules, language, rng, max_per_template)
                if texts:
                    merged.setdefault(label, {}).setdefault(sentence.text, set()).update(texts)
        for label in sorted(merged):
            templates = sorted(merged[label].items())
            if len(templates) < 2:
                continue  # a template cannot be on both sides, so the label needs two
            order = rng.permutation(len(templates))
            n_test = max(1, min(len(templates) - 1, round(len(templates) * test_template_fraction)))
            train[label] = [templates[i] for i in sorted(order[n_test:])]
            train_texts = {t for _, ts in train[label] for t in ts}
            test[label] = ({templates[i][0] for i in order[:n_test]},
                           {t for i in order[:n_test] for t in templates[i][1]} - train_texts)
    # A sentence that several intents produce has no single true label: drop it everywhere.
    owners: dict[str, int] = {}
    for name in train:
        for text in {t for _, ts in train[name] for t in ts} | test[name][1]:
            owners[text] = owners.get(text, 0) + 1
    pools: dict[str, dict[str, list[str]]] = {pool: {} for pool in POOLS}
    kept_test: dict[str, list[str]] = {}
    used: dict[str, set[str]] = {side: set() for side in TEMPLATE_SIDES}
    totals = {pool: 0 for pool in POOLS}
    for name in sorted(train):
        templates = [(source, sorted(t for t in ts if owners[t] == 1)) for source, ts in train[name]]
        templates = [(source, ts) for source, ts in templates if ts]
        test_texts = sorted(t for t in test[name][1] if owners[t] == 1)
        if not templates or not test_texts:
            continue
        sentences, sources = _split_between_pools(templates, totals, rng)
        for pool in POOLS:
            if sentences[pool]:  # a lone one-sentence template feeds one pool only
                pools[pool][name] = sentences[pool]
        kept_test[name] = test_texts
        for side, found in sources.items():
            used[side] |= found
        used["train"] |= {source for source, _ in templates}
        used["test"] |= test[name][0]
    return LanguagePools(language, pools, kept_test, used)


def _shared(all_pools: list[LanguagePools]) -> list[LanguagePools]:
    """Keep the intents that at least two of the languages cover (all of them for one language)."""
    counts: dict[str, int] = {}
    for pools in all_pools:
        for name in pools.test:
            counts[name] = counts.get(name, 0) + 1
    keep = {n for n, c in counts.items() if c >= 2 or len(all_pools) == 1}
    return [p.restrict(keep) for p in all_pools]


@dataclass(frozen=True)
class Variant:
    """What differs between the classification benchmark and its instruction twin: the labels of template
    blocks, the example a sentence becomes, the default languages."""

    name: str
    task: TaskKind
    default_languages: list[str]
    labeling: Callable[[str], LabelOf]  # language -> how its template blocks are labelled
    example: Callable[[str, str, str, dict[str, int]], dict]  # (language, label, sentence, label index) -> example


@lru_cache(maxsize=None)
def plain_replies(language: str) -> dict[str, str]:
    """(intent:reply key) -> the reply's text, for the replies of ``language`` that are plain text."""
    from home_assistant_intents import get_intents

    replies = (get_intents(language) or {}).get("responses", {}).get("intents", {})
    return {f"{intent}:{key}": text.strip() for intent, by_key in replies.items() for key, text in by_key.items()
            if isinstance(text, str) and text.strip() and "{{" not in text and "{%" not in text}


def reply_labeling(language: str) -> LabelOf:
    """Label a template block by (intent, the reply it names); blocks whose reply is not plain text are skipped."""
    replies = plain_replies(language)

    def label_of(name: str, data: Any) -> str | None:
        label = f"{name}:{data.response or 'default'}"
        return label if label in replies else None

    return label_of


def _reply_example(language: str, label: str, sentence: str, index: dict[str, int]) -> dict:
    return {"instruction": sentence, "response": plain_replies(language)[label]}


INTENTS = Variant("intents", "classification", DEFAULT_LANGUAGES, lambda language: intent_label,
                  lambda language, label, sentence, index: {"text": sentence, "label": index[label]})
CHAT = Variant("intents-chat", "instruction", CHAT_LANGUAGES, reply_labeling, _reply_example)


def _select_languages(languages, options: dict, variant: Variant) -> tuple[list[LanguagePools], dict[str, str]]:
    """Pools of the requested languages; with ``"all"`` or the default list, silently keep those
    with enough data (the others are returned with the reason); a language named explicitly that
    lacks data is an error."""
    explicit = languages not in (None, "all")
    names = (variant.default_languages if languages is None else available_languages() if languages == "all"
             else list(languages))
    known = set(available_languages())
    for language in names:
        if language not in known:
            raise FedP2EFTError(f"{variant.name}: unknown language '{language}'; available: {', '.join(sorted(known))}")
    all_pools = _shared([
        language_pools(n, options["seed"], options["max_per_template"], options["test_template_fraction"],
                       variant.labeling(n))
        for n in names
    ])
    min_examples = options["min_examples"] or options["train_size"]
    chosen, skipped = [], {}
    for pools in all_pools:
        problem = None
        smallest = min(pools.n_train(pool) for pool in POOLS)  # each pool fills its clients alone
        if len(pools.test) < options["min_labels"]:
            problem = (f"{len(pools.test)} shared labels with templates on both sides "
                       f"(min_labels={options['min_labels']})")
        elif smallest < min_examples:
            problem = (f"{smallest} distinct train sentences in its smaller client pool "
                       f"(min_examples={min_examples})")
        if problem is None:
            chosen.append(pools)
            continue
        skipped[pools.language] = problem
        if explicit:
            raise FedP2EFTError(
                f"{variant.name}: language '{pools.language}' has too little data: {problem}; drop it or lower the limit"
            )
    if not chosen:
        raise FedP2EFTError(f"{variant.name}: no language has enough data for these options")
    return chosen, skipped


def _examples(pools: LanguagePools, by_label: dict[str, list[str]], index: dict[str, int],
              variant: Variant) -> dict[int, list[dict]]:
    return {index[label]: [variant.example(pools.language, label, t, index) for t in texts]
            for label, texts in by_label.items()}


def build_intents(options: dict, variant: Variant = INTENTS) -> FederatedDataset:
    """Build the benchmark from scratch (deterministic in ``options``)."""
    all_pools, skipped = _select_languages(options["languages"], options, variant)
    labels = sorted({name for pools in all_pools for name in pools.test})
    index = {name: i for i, name in enumerate(labels)}
    rng = np.random.default_rng(options["seed"])
    clients: dict[str, list] = {pool: [] for pool in POOLS}
    k = options["clients_per_language"]
    for pools in all_pools:
        for pool in POOLS:
            # Within a pool clients sample from the pool's share (disjoint=False: the share is small);
            # across pools nothing is shared. The test side is common: nobody trains on it.
            ids = [f"{pools.language}-{pool[0]}{i}" for i in range(k)]
            clients[pool] += partition_language(
                pools.language, _examples(pools, pools.train[pool], index, variant),
                _examples(pools, pools.test, index, variant), ids, options["train_size"], options["test_size"],
                options["alpha"], rng, disjoint=False,
            )
    seen, unseen = clients["seen"], clients["unseen"]
    info = {
        "source": f"home-assistant-intents=={version('home-assistant-intents')}",
        "options": options,
        "languages": [p.language for p in all_pools],
        "skipped_languages": skipped,
        "templates": {p.language: {side: len(t) for side, t in p.templates.items()} for p in all_pools},
        "train_sentences": {p.language: {pool: p.n_train(pool) for pool in POOLS} for p in all_pools},
    }
    # Instruction examples carry no label: the reply is the target. Classification keeps the label names.
    return FederatedDataset(variant.name, variant.task, labels if variant.task == "classification" else [],
                            seen, unseen, info)


def _load(variant: Variant, options: dict) -> FederatedDataset:
    """``variant`` built once per option set and then read from the parquet cache."""
    unknown = set(options) - set(DEFAULTS) - {"languages", "min_examples", "cache"}
    if unknown:
        known = sorted([*DEFAULTS, "languages", "min_examples", "cache"])
        raise FedP2EFTError(f"{variant.name}: unknown option(s) {sorted(unknown)}; known: {known}")
    use_cache = options.pop("cache", True)
    merged = {**DEFAULTS, "languages": None, "min_examples": None, **options}
    if isinstance(merged["languages"], str) and merged["languages"] != "all":
        merged["languages"] = [x.strip() for x in merged["languages"].split(",") if x.strip()]
    if min(merged["clients_per_language"], merged["train_size"], merged["test_size"]) < 1 or merged["alpha"] <= 0:
        raise FedP2EFTError(f"{variant.name}: clients_per_language, train_size, test_size must be >= 1 and alpha > 0")
    versions = {"build": BUILD_VERSION, "package": version("home-assistant-intents"), "hassil": version("hassil")}
    key = json.dumps({**merged, **versions}, sort_keys=True)
    if not use_cache:
        return build_intents(merged, variant)
    return cached(variant.name, key, lambda: build_intents(merged, variant))


def load_intents(**options) -> FederatedDataset:
    """The embedded classification benchmark (user sentence -> intent)."""
    return _load(INTENTS, options)


def load_intents_chat(**options) -> FederatedDataset:
    """The embedded instruction benchmark (user sentence -> the assistant's reply in the same language)."""
    return _load(CHAT, options)
