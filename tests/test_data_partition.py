"""Dirichlet label-skew partitioning shared by every loader."""

import numpy as np
import pytest

from fedp2eft.data.partition import allocate, partition_language, split_items
from fedp2eft.errors import FedP2EFTError


def pools(n_labels, per_label, tag):
    return {l: [{"text": f"{tag}-{l}-{i}", "label": l} for i in range(per_label)] for l in range(n_labels)}


def test_allocate_respects_total_weights_and_capacity():
    counts = allocate(10, np.array([0.7, 0.2, 0.1]), np.array([100, 100, 100]))
    assert counts.tolist() == [7, 2, 1]
    capped = allocate(10, np.array([0.9, 0.1, 0.0]), np.array([3, 100, 100]))
    assert capped.sum() == 10 and capped[0] == 3
    assert allocate(10, np.ones(2), np.array([2, 3])).tolist() == [2, 3]


def test_disjoint_clients_share_no_example_and_test_follows_train_proportions():
    ids = [f"c{i}" for i in range(6)]
    clients = partition_language("xx", pools(3, 200, "tr"), pools(3, 100, "te"), ids, 40, 20, 0.5,
                                 np.random.default_rng(0), disjoint=True)
    seen_texts = [e["text"] for c in clients for e in c.train + c.test]
    assert len(seen_texts) == len(set(seen_texts)) == 6 * 60
    for client in clients:
        assert len(client.train) == 40 and len(client.test) == 20
        train_share = np.bincount([e["label"] for e in client.train], minlength=3) / 40
        test_share = np.bincount([e["label"] for e in client.test], minlength=3) / 20
        assert np.abs(train_share - test_share).max() <= 0.05 + 1e-9
    shares = {tuple(np.bincount([e["label"] for e in c.train], minlength=3)) for c in clients}
    assert len(shares) > 1  # label skew differs between clients


def test_deterministic_in_the_seed():
    def build(seed):
        return partition_language("xx", pools(4, 50, "a"), pools(4, 50, "b"), ["a", "b"], 10, 5, 0.5,
                                  np.random.default_rng(seed), disjoint=False)
    assert [c.train for c in build(1)] == [c.train for c in build(1)]
    assert [c.train for c in build(1)] != [c.train for c in build(2)]


def test_too_little_data_names_the_language():
    with pytest.raises(FedP2EFTError, match="language 'sw'.*train_size=50"):
        partition_language("sw", pools(2, 10, "a"), pools(2, 10, "b"), ["a", "b"], 50, 5, 0.5,
                           np.random.default_rng(0), disjoint=True)


def test_split_items_halves_once_per_seed_and_count():
    seen, unseen = split_items(101, 3)
    assert len(seen) == 50 and len(unseen) == 51
    assert set(seen.tolist()).isdisjoint(unseen.tolist())
    assert sorted([*seen.tolist(), *unseen.tolist()]) == list(range(101))
    again = split_items(101, 3)  # the same halves for every language with this many rows
    assert seen.tolist() == again[0].tolist() and unseen.tolist() == again[1].tolist()
    assert set(split_items(101, 4)[0].tolist()) != set(seen.tolist())
    assert sorted(seen.tolist()) != list(range(50))  # shuffled, not the first rows
