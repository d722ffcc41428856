"""The engine-free client updates that Flower runs: PS generator and base model (docs/method.md, "Federated
training")."""

import pytest
import torch

from conftest import LABELS, bert_config, classification_examples, make_tokenizer
from fedp2eft.core.base_training import BaseModelTask, BaseTrainingConfig
from fedp2eft.core.generator import GeneratorSpec, PSGenerator
from fedp2eft.core.generator_training import GeneratorTask, GeneratorTrainingConfig, fit_error_sized, fit_l1_adam
from fedp2eft.core.methods import PersonalizeConfig
from fedp2eft.core.modeling import SequenceClassifier, classifier_from_config, load_causal_lm
from fedp2eft.core.tasks import ClassificationTask
from fedp2eft.data.types import ClientData
from fedp2eft.errors import FedP2EFTError

CLIENTS = [ClientData(f"c{i}", "xx", classification_examples(24, seed=10 + i), classification_examples(8, seed=20 + i))
           for i in range(3)]
SMALL = PersonalizeConfig(max_rank=4, batch_size=8, lora_lr=1e-2, scale_lr=5e-2)


def generator_task(setup, **overrides) -> GeneratorTask:
    base, task, _, _ = setup
    clients = CLIENTS if task.kind == "classification" else [
        ClientData(c.client_id, "xx", [{"instruction": f"what is the color of {e['text']}", "response": "blue"}
                                        for e in c.train], []) for c in CLIENTS]
    config = GeneratorTrainingConfig(personalize=SMALL, local_epochs=1, regression_steps=10, regression_lr=1e-2,
                                     **overrides)
    return GeneratorTask(base, task, clients, config, "tiny")


def test_generator_client_update_fits_learned_scales(setup):
    task = generator_task(setup)
    weights = task.initial_weights()
    update = task.client_update(weights, client_index=1, server_round=1)
    assert update.num_examples == 24
    assert {k: v.shape for k, v in update.weights.items()} == {k: v.shape for k, v in weights.items()}
    assert update.metrics["mean_lambda"] > 1e-3  # stage 1 moved lambda up from 1e-4
    assert update.metrics["l1_after"] < update.metrics["l1_before"]  # stage 2 regressed towards it
    assert not all(torch.equal(update.weights[k], weights[k]) for k in weights)
    again = task.client_update(weights, client_index=1, server_round=1)
    assert all(torch.equal(again.weights[k], update.weights[k]) for k in weights)  # deterministic


def test_error_sized_stage_2_ranks_the_targets_that_l1_ties():
    """docs/discussion.md, "The generator's ties": ten L1 Adam steps give outputs below their targets one update
    whatever the target, so targets 5, 3 and 0.5 come out level; an error-sized step keeps their order and, each
    step removing half the error of the linearized fit, lands within 2^-10 of the targets."""
    spec = GeneratorSpec(base_model="m", module_names=("a", "b", "c"), rank=2, feature_layers=("l0", "l1"))
    x = torch.rand(spec.num_inputs, generator=torch.Generator().manual_seed(0)) * 4
    target, mask = torch.tensor([5.0, 3.0, 0.5, 0.2, 1e-4, 1e-4]), torch.ones(6)
    fitted = {}
    for name, fit, size in (("l1", fit_l1_adam, 1e-2), ("error", fit_error_sized, 0.5)):
        torch.manual_seed(0)
        generator = PSGenerator(spec)
        fit(generator, x, target, mask, 10, size)
        fitted[name] = generator(x).detach()
    level = fitted["l1"][:3]
    # the rows start from weights of size ~1e-6 (the generator's init gain), far below the targets' gaps
    assert float(level.max() - level.min()) < 1e-4 * float(level.max())
    assert float(level.max()) < 0.5  # and all three are still below the smallest of their targets
    assert torch.allclose(fitted["error"], target, rtol=1e-2, atol=1e-4)  # 2^-10 of the error, some nonlinearity


def test_a_generator_round_with_error_sized_regression_fits_the_learned_scales(setup):
    paper, ranking = generator_task(setup), generator_task(setup, regression="error-sized")
    weights = paper.initial_weights()
    by_l1, by_error = paper.client_update(weights, 1, 1), ranking.client_update(weights, 1, 1)
    assert by_error.metrics["l1_before"] == by_l1.metrics["l1_before"]  # the same stage 1, the same targets
    assert by_error.metrics["l1_after"] < 0.05 * by_error.metrics["l1_before"] < by_l1.metrics["l1_after"]
    with pytest.raises(FedP2EFTError, match="training.regression 'l2' is unknown"):
        GeneratorTrainingConfig.from_dict({"regression": "l2"})
    with pytest.raises(FedP2EFTError, match="regression_fraction 1.5 must lie in"):
        GeneratorTrainingConfig.from_dict({"regression_fraction": 1.5})


def test_generator_budget_sampling_masks_all_but_top_entries(setup):
    task = generator_task(setup, budget_sampling=True, budget_warmup_rounds=1)
    weights = task.initial_weights()
    assert task.client_update(weights, 0, server_round=1).metrics["budget"] == 0.0  # warm-up: no budget
    budgets = {task.client_update(weights, 0, server_round=r).metrics["budget"] for r in range(2, 8)}
    assert budgets <= {4.0, 2.0, 1.0} and len(budgets) >= 2


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_base_model_task(setup, mode, tmp_path):
    base, task, _, _ = setup
    clients = generator_task(setup).clients
    fed = BaseModelTask(base, task, clients, BaseTrainingConfig(mode=mode, local_epochs=2, batch_size=8, lr=1e-2))
    start = fed.initial_weights()
    update = fed.client_update(start, 0, 1)
    assert update.metrics["train_loss"] > 0 and update.num_examples == 24
    assert any(not torch.equal(update.weights[k], start[k]) for k in start)
    if mode == "lora":
        assert all("lora_" in k or k.startswith("base_model.model.head.") for k in start)
    batch = task.collate(clients[0].train[:4])
    fed.load(update.weights)
    expected = fed.model(**batch).logits.detach()
    fed.save_checkpoint(update.weights, tmp_path)
    loaded = (SequenceClassifier.from_pretrained(tmp_path, LABELS) if task.kind == "classification"
              else load_causal_lm(tmp_path))
    assert torch.allclose(loaded(**batch).logits, expected, rtol=1e-4, atol=1e-4)  # merge rounding


def test_unknown_training_keys_are_named():
    with pytest.raises(FedP2EFTError, match=r"training: unknown key\(s\) \['local_epoch'\]"):
        GeneratorTrainingConfig.from_dict({"local_epoch": 2})
    with pytest.raises(FedP2EFTError, match=r"personalize.priors: unknown key\(s\) \['rate'\]"):
        GeneratorTrainingConfig.from_dict({"personalize": {"priors": {"rate": 1.0}}})
    config = GeneratorTrainingConfig.from_dict({"local_epochs": 3, "personalize": {"max_rank": 8,
                                                                                    "priors": {"gamma_rate": 5.0}}})
    assert config.local_epochs == 3 and config.personalize.max_rank == 8
    assert config.personalize.priors.gamma_rate == 5.0


def test_budget_warmup_defaults_to_the_papers_share_of_the_rounds():
    from fedp2eft.core.generator_training import GeneratorTrainingConfig
    from fedp2eft.errors import FedP2EFTError

    assert GeneratorTrainingConfig.from_dict({"budget_sampling": True, "total_rounds": 150}).warmup_rounds == 20
    assert GeneratorTrainingConfig.from_dict({"budget_sampling": True, "total_rounds": 30}).warmup_rounds == 4
    assert GeneratorTrainingConfig.from_dict({"budget_sampling": True, "total_rounds": 30,
                                              "budget_warmup_rounds": 0}).warmup_rounds == 0
    with pytest.raises(FedP2EFTError, match="needs budget_warmup_rounds or total_rounds"):
        GeneratorTrainingConfig.from_dict({"budget_sampling": True})


def test_base_model_update_does_not_depend_on_the_workers_random_state():
    """Dropout masks come from the update's own seed, not from what the worker process drew before."""
    config = bert_config(len(make_tokenizer()))
    config.hidden_dropout_prob = 0.3
    base = classifier_from_config(config, LABELS)
    task = ClassificationTask(make_tokenizer(), LABELS, max_length=32)
    fed = BaseModelTask(base, task, CLIENTS, BaseTrainingConfig(mode="full", local_epochs=1, batch_size=8, lr=1e-2))
    start = fed.initial_weights()
    torch.manual_seed(1)
    first = fed.client_update(start, 0, 1)
    torch.manual_seed(2)
    torch.rand(100)
    second = fed.client_update(start, 0, 1)
    assert all(torch.equal(first.weights[k], second.weights[k]) for k in start)
    third = fed.client_update(start, 0, 2)  # another round draws other masks and batches
    assert not all(torch.equal(first.weights[k], third.weights[k]) for k in start)
