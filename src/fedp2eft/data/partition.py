"""Dirichlet label-skew partitioning shared by every loader (the paper's client construction, docs/data.md).

Each client of a language draws label proportions from Dirichlet(alpha); its train set follows them
and its test set is drawn with the same proportions, so the test measures the client's own
distribution. With ``disjoint=True`` examples are used by at most one client (real corpora such as
XNLI); with ``disjoint=False`` clients sample independently from a shared pool (the template
benchmark, whose pools are small by nature). Loaders that must keep the seen and unseen client pools
apart call ``partition_language`` once per pool, each with its own examples (``split_items``).
"""

from __future__ import annotations

import numpy as np

from fedp2eft.data.types import ClientData
from fedp2eft.errors import FedP2EFTError


def allocate(total: int, weights: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Integer counts summing to at most ``total``, proportional to ``weights`` (largest remainder),
    never above ``capacity``; what a full label cannot take goes to the others."""
    weights = np.asarray(weights, dtype=float)
    capacity = np.asarray(capacity, dtype=int)
    counts = np.zeros(len(capacity), dtype=int)
    while counts.sum() < total:
        open_ = counts < capacity
        if not open_.any():
            break
        w = np.where(open_, weights, 0.0)
        if w.sum() <= 0:
            w = open_.astype(float)
        remaining = total - counts.sum()
        share = w / w.sum() * remaining
        add = np.floor(share).astype(int)
        order = np.argsort(-(share - add), kind="stable")
        for i in order[: remaining - add.sum()]:
            add[i] += 1
        add = np.minimum(add, capacity - counts)
        if add.sum() == 0:
            break
        counts += add
    return counts


def _draw(rng: np.random.Generator, size: int, used: set[int], count: int, disjoint: bool) -> list[int]:
    """``count`` distinct indices below ``size``; with ``disjoint`` never one used before."""
    free = [i for i in range(size) if not (disjoint and i in used)]
    picked = rng.choice(len(free), size=count, replace=False) if count else []
    chosen = [free[int(i)] for i in picked]
    if disjoint:
        used.update(chosen)
    return chosen


def partition_language(
    language: str,
    train_pool: dict[int, list[dict]],
    test_pool: dict[int, list[dict]],
    client_ids: list[str],
    train_size: int,
    test_size: int,
    alpha: float,
    rng: np.random.Generator,
    disjoint: bool,
    strict: bool = True,
) -> list[ClientData]:
    """Build one client per id for ``language`` from per-label pools of examples.

    Only labels present in both pools can be drawn, so every test label was seen in training.
    Sizes are targets: with ``strict`` a client the pools cannot fill is an error naming the
    language; without it (sizes derived from the data, not asked for) it gets what is left.
    """
    labels = sorted(label for label in train_pool if train_pool[label] and test_pool.get(label))
    if not labels:
        raise FedP2EFTError(f"language '{language}': no label has both train and test examples")
    used_train = {label: set() for label in labels}
    used_test = {label: set() for label in labels}

    def capacity(pool: dict, used: dict) -> np.ndarray:
        return np.array([len(pool[label]) - (len(used[label]) if disjoint else 0) for label in labels])

    clients = []
    for client_id in client_ids:
        proportions = rng.dirichlet(np.full(len(labels), alpha))
        train_counts = allocate(train_size, proportions, capacity(train_pool, used_train))
        if train_counts.sum() < (train_size if strict else 1):
            raise FedP2EFTError(
                f"language '{language}': only {train_counts.sum()} train examples left for client "
                f"'{client_id}' but train_size={train_size}; lower train_size or the number of clients, "
                "or leave this language out"
            )
        test_capacity = np.where(train_counts > 0, capacity(test_pool, used_test), 0)
        test_counts = allocate(test_size, train_counts, test_capacity)
        if test_counts.sum() < (test_size if strict else 1):
            raise FedP2EFTError(
                f"language '{language}': only {test_counts.sum()} test examples with client "
                f"'{client_id}''s labels but test_size={test_size}; lower test_size or the number of clients"
            )
        train, test = [], []
        for label, n_train, n_test in zip(labels, train_counts, test_counts):
            sides = ((train_pool, used_train, n_train, train), (test_pool, used_test, n_test, test))
            for pool, used, count, out in sides:
                out += [pool[label][i] for i in _draw(rng, len(pool[label]), used[label], count, disjoint)]
        rng.shuffle(train)
        rng.shuffle(test)
        clients.append(ClientData(client_id, language, train, test))
    return clients


def split_items(n_items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Item indices ``0..n_items-1`` shuffled once and halved into (seen, unseen).

    The shuffle depends only on ``seed`` and ``n_items``, so in a parallel corpus (row i of every
    language is a translation of item i) every language gets the same halves and no item reaches
    both pools through different languages; with other row counts it is a plain disjoint split.
    """
    order = np.random.default_rng([seed, n_items]).permutation(n_items)
    return order[: n_items // 2], order[n_items // 2 :]


def split_pools(clients: list[ClientData], per_pool: int) -> tuple[list[ClientData], list[ClientData]]:
    """First ``per_pool`` clients of a language are *seen*, the next ``per_pool`` *unseen*."""
    return clients[:per_pool], clients[per_pool : 2 * per_pool]


def group_by_label(examples: list[dict]) -> dict[int, list[dict]]:
    pools: dict[int, list[dict]] = {}
    for example in examples:
        pools.setdefault(example["label"], []).append(example)
    return pools
