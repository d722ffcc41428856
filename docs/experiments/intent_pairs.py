"""A harder task per client for the search of "Where the budget binds" (docs/discussion.md): intent *pairs*.

Question: on single requests two ranks per module reach the ceiling, because one sentence's intent is cued by its
words. The paper's setting (XNLI) is a relation between two sentences. Does rank bind when a client must read the
relation of two requests rather than the label of one?

Each client of the embedded ``intents`` benchmark (same languages, pools and sentences, so the unseen clients still
share no training sentence with the seen ones) becomes a client of sentence pairs: ``same`` when both requests carry
the same intent, ``different`` otherwise, half and half. A negative partner comes, when the client has one, from an
intent of the same family (one that shares a word of its name: HassTurnOn / HassTurnOff, HassStartTimer /
HassCancelTimer), so that a keyword alone does not decide. Training pairs are built from the client's training
sentences, test pairs from its test sentences (template-disjoint from training). The file is ordinary user data
(docs/data.md, "Your own data": ``client``, ``pool``, ``split``), run with ``dataset=<file>``.

    python docs/experiments/intent_pairs.py --out results/intent-pairs.jsonl [--train-pairs 96 --test-pairs 48]

Used by ``docs/experiments/budget_binding.py --settings sentence-pairs``, which quotes its output.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedp2eft.data.registry import load_dataset
from fedp2eft.data.types import ClientData

# The main job's data (profiles/full.yaml): four languages, four scripts, one low-resource; three clients per pool.
INTENT_OPTIONS = dict(languages=["en", "zh-CN", "hi", "cy"], clients_per_language=3, test_size=48)


def family_words(intent: str) -> set[str]:
    """The words of an intent's name, without the common prefix: HassTurnOn -> {Turn, On}."""
    return set(re.findall(r"[A-Z][a-z]+", intent.removeprefix("Hass"))) - {"Get", "Set"}


def pairs_of(examples: list[dict], labels: list[str], count: int, rng: np.random.Generator) -> list[dict]:
    """``count`` pairs of distinct sentences, alternately of the same intent and of different ones (a same-family
    partner when there is one). A client with a single intent gets only ``same`` pairs, one with single sentences
    only ``different`` ones: the skew of its data, not a bug."""
    by_intent: dict[int, list[str]] = defaultdict(list)
    for example in examples:
        by_intent[example["label"]].append(example["text"])
    intents = sorted(by_intent)
    repeatable = [i for i in intents if len(by_intent[i]) >= 2]
    if not repeatable and len(intents) < 2:
        raise SystemExit(f"a client with {len(examples)} sentence(s) of one intent makes no pair")
    out = []
    for n in range(count):
        want_same = bool(repeatable) and (n % 2 == 0 or len(intents) < 2)
        first = int(rng.choice(repeatable if want_same else intents))
        a = by_intent[first][rng.integers(len(by_intent[first]))]
        if want_same:
            b = rng.choice([t for t in by_intent[first] if t != a])
        else:
            others = [i for i in intents if i != first]
            kin = [i for i in others if family_words(labels[i]) & family_words(labels[first])]
            second = int(rng.choice(kin if kin and rng.random() < 0.5 else others))
            b = by_intent[second][rng.integers(len(by_intent[second]))]
        out.append({"text": a, "text_pair": str(b), "label": "same" if want_same else "different"})
    return out


def client_rows(client: ClientData, pool: str, labels: list[str], train_pairs: int, test_pairs: int,
                rng: np.random.Generator) -> list[dict]:
    tag = {"client": client.client_id, "language": client.language, "pool": pool}
    return ([{**pair, **tag, "split": "train"} for pair in pairs_of(client.train, labels, train_pairs, rng)]
            + [{**pair, **tag, "split": "test"} for pair in pairs_of(client.test, labels, test_pairs, rng)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/intent-pairs.jsonl"))
    parser.add_argument("--train-pairs", type=int, default=96, help="per client (the paper's clients hold ~100)")
    parser.add_argument("--test-pairs", type=int, default=48, help="per client")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_dataset("intents", seed=args.seed, **INTENT_OPTIONS)
    rng = np.random.default_rng(args.seed)
    rows = [row for pool in ("seen", "unseen") for client in data.pool(pool)
            for row in client_rows(client, pool, data.labels, args.train_pairs, args.test_pairs, rng)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    same = sum(row["label"] == "same" for row in rows)
    print(f"{args.out}: {len(rows)} pairs, {len(data.seen)} seen and {len(data.unseen)} unseen clients, "
          f"{100 * same / len(rows):.0f}% same")


if __name__ == "__main__":
    main()
