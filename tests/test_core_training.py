"""Length-grouped batches: the groups cover the batch, skip padding and give the batch's gradient."""

import random

import pytest
import torch

from conftest import FILLER, TRAINED_LOSS_REL, adam_rounding_tolerance, classification_examples
from fedp2eft.core import tasks
from fedp2eft.core.methods import method_lr, personalize, personalize_config
from fedp2eft.core.tasks import length_groups

CONFIG = personalize_config(dict(max_rank=8, epochs=2, batch_size=8, lora_lr=1e-2, scale_lr=5e-2, adalora_lr=5e-2,
                                  bayestune_epochs=2))
CPU = torch.device("cpu")


def varied_examples(kind: str, count: int) -> list[dict]:
    """Examples whose token lengths differ a lot within a batch (what length grouping is for)."""
    rng = random.Random(3)
    if kind == "bert":
        examples = classification_examples(count, seed=4)
        for example in examples[::3]:
            example["text"] += " " + " ".join(rng.choices(FILLER, k=12))
        return examples
    return [{"instruction": "what is the color of " + " ".join(rng.choices(FILLER, k=rng.choice([0, 1, 10])))
             + " " + thing, "response": answer}
            for thing, answer in (rng.choice([("sun", "yellow"), ("sky", "blue"), ("snow", "white")])
                                  for _ in range(count))]


def test_groups_cover_every_row_once_cut_padding_and_share_the_loss(setup, model_kind):
    _, task, _, _ = setup
    batch = task.collate(varied_examples(model_kind, 16))
    groups = length_groups(batch, task.loss_units, CPU)
    assert len(groups) > 1
    assert sum(share for _, share in groups) == pytest.approx(1.0)
    rows = sorted(tuple(row.tolist()) for part, _ in groups
                  for row in torch.nn.functional.pad(part["input_ids"], (0, batch["input_ids"].shape[1]
                                                                          - part["input_ids"].shape[1])))
    assert rows == sorted(tuple(row.tolist()) for row in batch["input_ids"])
    for part, share in groups:
        assert part["attention_mask"][:, -1].any()  # cut to its own longest row
        assert share == pytest.approx(float(task.loss_units(part).sum() / task.loss_units(batch).sum()))
    padded = sum(part["attention_mask"].numel() for part, _ in groups)
    assert padded < batch["attention_mask"].numel()
    assert length_groups(batch, task.loss_units, torch.device("meta")) == [(batch, 1.0)]  # never split off the CPU


@pytest.mark.parametrize("method", ["lora", "btlora", "adalora"])
def test_grouped_training_gives_the_whole_batch_result(setup, model_kind, method, monkeypatch):
    """The tiny models have no dropout, so grouping may change nothing but float rounding."""
    base, task, _, _ = setup
    train = varied_examples(model_kind, 32)
    results = {}
    for cost in (10**9, 0):  # one group per batch / a group per distinct length
        monkeypatch.setattr(tasks, "CPU_CALL_COST_TOKENS", cost)
        result = personalize(method, base, task, train, budget=4, config=CONFIG)
        results[cost] = (result.metrics["train_loss_last_epoch"],
                         {name: p.detach().clone() for name, p in result.model.named_parameters() if p.requires_grad})
        steps = result.metrics["steps"]
    (loss_whole, whole), (loss_grouped, grouped) = results[10**9], results[0]
    assert loss_grouped == pytest.approx(loss_whole, rel=TRAINED_LOSS_REL)
    assert whole.keys() == grouped.keys() and whole
    tolerance = adam_rounding_tolerance(method_lr(CONFIG, method), steps)
    for name in whole:
        torch.testing.assert_close(whole[name], grouped[name], atol=tolerance, rtol=0, msg=name)
