import torch

from fedp2eft.core.btlora import default_target_modules
from fedp2eft.core.features import RunningMoments, client_features, feature_layer_names
from fedp2eft.core.tasks import iterate_batches


def test_running_moments_match_numpy_on_uneven_chunks():
    torch.manual_seed(0)
    data = torch.randn(1000, dtype=torch.float64) * 3 + 100
    moments = RunningMoments()
    for chunk in torch.split(data, [1, 7, 300, 2, 690]):
        moments.add(chunk)
    assert abs(moments.mean - data.mean().item()) < 1e-10
    assert abs(moments.std - data.std(unbiased=False).item()) < 1e-10


def test_feature_layers_include_lm_head_only_for_causal_lm(setup):
    model = setup[0]
    targets = default_target_modules(model)
    names = feature_layer_names(model, targets)
    has_head = not hasattr(model, "encoder")
    assert names[: len(targets)] == targets
    assert (names[-1] == "lm_head") == has_head
    assert len(names) == len(targets) + int(has_head)


def test_features_invariant_to_batch_size(setup):
    model, task, train, _ = setup
    names = feature_layer_names(model, default_target_modules(model))
    by_size = [client_features(model, iterate_batches(train, task.collate, size), names) for size in (1, 5, 48)]
    assert by_size[0].shape == (2 * len(names),)
    for other in by_size[1:]:
        assert torch.allclose(by_size[0], other, rtol=1e-4, atol=1e-5)


def test_features_ignore_padding(setup):
    model, task, train, _ = setup
    names = feature_layer_names(model, default_target_modules(model))
    batches = list(iterate_batches(train, task.collate, 8))
    padded = []
    for batch in batches:  # append 5 extra pad positions to every row
        pad = torch.full((batch["input_ids"].shape[0], 5), task.tokenizer.pad_token_id)
        padded.append({
            "input_ids": torch.cat([batch["input_ids"], pad], 1),
            "attention_mask": torch.cat([batch["attention_mask"], torch.zeros_like(pad)], 1),
        })
    plain = client_features(model, batches, names)
    with_padding = client_features(model, padded, names)
    assert torch.allclose(plain, with_padding, rtol=1e-4, atol=1e-5)


def test_feature_batches_are_the_inputs_without_labels(setup):
    _, task, train, _ = setup
    full, inputs = task.collate(train[:6]), task.feature_collate(train[:6])
    assert "labels" not in inputs and "attention_mask" in inputs
    if task.kind == "classification":
        assert inputs.keys() == full.keys() - {"labels"}
        assert all(torch.equal(inputs[key], full[key]) for key in inputs)
    else:  # the prompt only: every row is its prompt's tokens, then padding
        for row, example in enumerate(train[:6]):
            prompt = task.prompt_ids(example["instruction"])
            assert int(inputs["attention_mask"][row].sum()) == len(prompt)
            assert inputs["input_ids"][row, : len(prompt)].tolist() == prompt
            assert full["input_ids"].shape[1] > inputs["input_ids"].shape[1]


def test_instruction_features_ignore_the_responses(tokenizer):
    from transformers import LlamaForCausalLM

    from conftest import ANSWERS, instruction_examples, llama_config
    from fedp2eft.core.tasks import InstructionTask

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(len(tokenizer)))
    task = InstructionTask(tokenizer, max_length=32)
    names = feature_layer_names(model, default_target_modules(model))
    examples = instruction_examples(24, seed=3)
    colours = list(ANSWERS.values())
    other = [{**example, "response": " ".join(colours[(i + j) % len(colours)] for j in range(1 + i % 3))}
             for i, example in enumerate(examples)]
    assert [e["response"] for e in other] != [e["response"] for e in examples]
    first = client_features(model, iterate_batches(examples, task.feature_collate, 8), names)
    second = client_features(model, iterate_batches(other, task.feature_collate, 8), names)
    assert torch.equal(first, second)
    with_responses = client_features(model, iterate_batches(other, task.collate, 8), names)
    assert not torch.equal(first, with_responses)  # the responses would have changed them
