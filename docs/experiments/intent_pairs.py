"""A harder task per client for the search of "Where the budget binds" (docs/discussion.md): intent *pairs*.

Question: on single requests two ranks per module reach the ceiling, because one sentence's intent is cued by its
words. The paper's setting (XNLI) is a relation between two sentences. Does rank bind when a client must read the
relation of two requests rather than the label of one?

Each client of the embedded ``intents`` benchmark (same languages, pools and sentences, so the unseen clients still
share no training sentence with the seen ones) becomes a client of sentence pairs: ``same`` when both requests carry
the same intent, ``different`` otherwise, alternating while the client's label skew allows, and each sentence in
one pair only (a client draws twice as many sentences as it holds pairs). A negative partner comes, when the client has one, from an
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
INTENT_OPTIONS = dict(languages=["en", "zh-CN", "hi", "cy"], clients_per_language=3)


def family_words(intent: str) -> set[str]:
    """The words of an intent's name, without the common prefix: HassTurnOn -> {Turn, On}."""
    return set(re.findall(r"[A-Z][a-z]+", intent.removeprefix("Hass"))) - {"Get", "Set"}


def pairs_of(examples: list[dict], labels: list[str], rng: np.random.Generator) -> list[dict]:
    """Pairs of a client's sentences, each sentence in one pair only: a validation split of the pairs then shares
    no sentence with the pairs trained on (with reuse, a validation pair would test sentences whose intents were
    already fitted). Same-intent and different-intent pairs alternate while the client's label skew allows; a
    different-intent partner is of the same family when the client has one."""
    left: dict[int, list[str]] = defaultdict(list)
    for example in rng.permutation(len(examples)):
        left[examples[example]["label"]].append(examples[example]["text"])
    out = []
    for n in range(len(examples) // 2):
        repeatable = [i for i in left if len(left[i]) >= 2]
        present = [i for i in left if left[i]]
        if not repeatable and len(present) < 2:
            break
        same = bool(repeatable) and (n % 2 == 0 or len(present) < 2)
        first = int(rng.choice(repeatable if same else present))
        a = left[first].pop()
        if same:
            second = first
        else:
            others = [i for i in present if i != first]
            kin = [i for i in others if family_words(labels[i]) & family_words(labels[first])]
            second = int(rng.choice(kin if kin and rng.random() < 0.5 else others))
        out.append({"text": a, "text_pair": left[second].pop(), "label": "same" if same else "different"})
    return out


def client_rows(client: ClientData, pool: str, labels: list[str], rng: np.random.Generator) -> list[dict]:
    tag = {"client": client.client_id, "language": client.language, "pool": pool}
    return ([{**pair, **tag, "split": "train"} for pair in pairs_of(client.train, labels, rng)]
            + [{**pair, **tag, "split": "test"} for pair in pairs_of(client.test, labels, rng)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/intent-pairs.jsonl"))
    parser.add_argument("--train-pairs", type=int, default=96, help="per client, at most (the paper's hold ~100)")
    parser.add_argument("--test-pairs", type=int, default=48, help="per client, at most")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_dataset("intents", seed=args.seed, **INTENT_OPTIONS, train_size=2 * args.train_pairs,
                        test_size=2 * args.test_pairs)
    rng = np.random.default_rng(args.seed)
    rows = [row for pool in ("seen", "unseen") for client in data.pool(pool)
            for row in client_rows(client, pool, data.labels, rng)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    same = sum(row["label"] == "same" for row in rows)
    train = sum(row["split"] == "train" for row in rows)
    print(f"{args.out}: {len(rows)} pairs ({train} train), {len(data.seen)} seen and {len(data.unseen)} unseen "
          f"clients, {100 * same / len(rows):.0f}% same")


if __name__ == "__main__":
    main()
