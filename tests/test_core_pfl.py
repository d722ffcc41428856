"""Personalized-FL bases (docs/method.md, "Personalized-FL bases"): what FedDPA-T, FedSA-LoRA and DEPT clients
share and keep, and that a client's personal base rebuilt from its kept state computes what the client trained."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import LABELS
from fedp2eft.core.base_training import BaseTrainingConfig
from fedp2eft.core.client_state import ClientStateStore
from fedp2eft.core.modeling import SequenceClassifier, load_causal_lm
from fedp2eft.core.pfl import ALGORITHM_SETTINGS, apply_overlay, base_model_task, client_overlay, \
    own_embeddings, personal_overlay, read_pfl_metadata, record_client_states
from fedp2eft.errors import FedP2EFTError
from test_core_federated_tasks import generator_task


def pfl_task(setup, algorithm: str):
    base, task, _, _ = setup
    settings = {**ALGORITHM_SETTINGS[algorithm], "lr": 1e-2, "local_epochs": 2, "batch_size": 8}
    if "lora_dropout" in settings:
        settings["lora_dropout"] = 0.0  # so a forward is deterministic and comparable below
    config = BaseTrainingConfig(algorithm=algorithm, **settings)
    return base_model_task(base, task, generator_task(setup).clients, config)


def load_plain(task, directory):
    return (SequenceClassifier.from_pretrained(directory, LABELS) if task.kind == "classification"
            else load_causal_lm(directory))


@pytest.mark.parametrize("algorithm", ["feddpa-t", "fedsa-lora", "dept"])
def test_clients_share_the_global_part_keep_their_own_and_rebuild_it_as_a_personal_base(setup, algorithm, tmp_path):
    fed = pfl_task(setup, algorithm)
    start = fed.initial_weights()
    first = fed.client_update(start, 0, 1, None)
    assert first.state and not set(first.state) & set(first.weights)  # the kept part never travels
    assert any(not torch.equal(first.weights[k], start[k]) for k in start)
    if algorithm == "feddpa-t":
        assert all(".global." in k or ".head." in k for k in first.weights)
        assert all(".local." in k for k in first.state) and any("lora_B" in k and v.abs().sum() > 0
                                                              for k, v in first.state.items())
    elif algorithm == "fedsa-lora":  # A (and the head) travel, B stays: one LoRA split in two
        assert all(".lora_A." in k or ".head." in k for k in first.weights) and any(".lora_A." in k
                                                                                   for k in first.weights)
        assert all(".lora_B." in k for k in first.state) and all(v.abs().sum() > 0 for v in first.state.values())
    else:  # only the rows of the client's own tokens, not the whole table
        assert set(first.state) == {"rows", "values"} and 0 < len(first.state["rows"]) < len(fed.initial_embeddings)
    # the state is the client's: another client's state gives another update
    again = fed.client_update(start, 0, 2, first.state)
    fresh = fed.client_update(start, 0, 2, None)
    assert any(not torch.equal(again.state[k], fresh.state[k]) for k in again.state)

    # what the client computes with its state after the round = the exported global model + its overlay
    batch = fed.task.collate(fed.clients[0].train[:4])
    fed.load(again.weights)
    parameters = dict(fed.model.named_parameters())
    with torch.no_grad():
        if algorithm == "dept":
            parameters[fed.embedding_name].copy_(own_embeddings(fed.initial_embeddings, again.state))
        else:
            for name, tensor in again.state.items():
                parameters[name].copy_(tensor)
        if algorithm == "feddpa-t":
            fed.model.base_model.set_adapter(["global", "local"])
    fed.model.eval()
    expected = fed.model(**batch).logits.detach()
    fed.export(again.weights, tmp_path)
    store = ClientStateStore(tmp_path / "clients", 0)
    store.save(2, again.state)
    record_client_states(tmp_path / "model", tmp_path / "clients", {0: 2, 1: 0})
    metadata = read_pfl_metadata(tmp_path / "model")
    assert metadata["algorithm"] == algorithm and metadata["client_rounds"] == {"0": 2, "1": 0}
    plain = load_plain(fed.task, tmp_path / "model").eval()
    untouched = plain(**batch).logits.detach()
    assert metadata["clients"] == [c.client_id for c in fed.clients]
    with pytest.raises(FedP2EFTError, match="trained on other clients"):
        personal_overlay(tmp_path / "model", metadata, plain, 0, "someone-else")
    overlay = personal_overlay(tmp_path / "model", metadata, plain, 0, fed.clients[0].client_id)
    with apply_overlay(plain, overlay):
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(plain(**batch).logits, untouched)  # restored exactly
    assert personal_overlay(tmp_path / "model", metadata, plain, 1, fed.clients[1].client_id) is None  # never trained: the global model


def test_dept_checkpoint_holds_the_starting_embeddings_not_a_clients(setup, tmp_path):
    fed = pfl_task(setup, "dept")
    update = fed.client_update(fed.initial_weights(), 1, 1, None)
    fed.export(update.weights, tmp_path)
    plain = load_plain(fed.task, tmp_path / "model")
    assert torch.equal(plain.get_input_embeddings().weight, fed.initial_embeddings)
    assert json.loads((tmp_path / "model" / "pfl.json").read_text())["algorithm"] == "dept"


def test_a_feddpa_state_with_foreign_tensors_is_refused(setup):
    model = setup[0]
    with pytest.raises(FedP2EFTError, match="unexpected tensor"):
        client_overlay({"algorithm": "feddpa-t", "lora_scaling": 1.0}, model, {"embeddings.weight": torch.zeros(1)})


def test_fedsa_lora_checkpoint_is_the_base_with_the_averaged_head_and_the_shared_a_beside_it(setup, tmp_path):
    fed = pfl_task(setup, "fedsa-lora")
    before = {name: tensor.clone() for name, tensor in fed.model.get_base_model().state_dict().items()
              if "lora_" not in name}
    update = fed.client_update(fed.initial_weights(), 1, 1, None)
    fed.export(update.weights, tmp_path)
    plain = load_plain(fed.task, tmp_path / "model").state_dict()
    targets = [name for name in before if name.replace("base_layer.", "") in plain and "base_layer" in name]
    assert targets  # the LoRA's target modules: merged with B = 0, so exactly the starting weights
    for name in targets:
        assert torch.equal(plain[name.replace("base_layer.", "")], before[name])
    shared = load_file(tmp_path / "model" / "shared_lora.safetensors")
    assert set(shared) == {k for k in update.weights if ".lora_A." in k}
    assert all(torch.equal(shared[k], update.weights[k]) for k in shared)
    metadata = read_pfl_metadata(tmp_path / "model")
    with pytest.raises(FedP2EFTError, match="lacks the A or B matrix"):
        client_overlay(metadata, load_plain(fed.task, tmp_path / "model"), update.state)  # B without the shared A
