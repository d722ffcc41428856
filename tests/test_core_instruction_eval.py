import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import instruction_examples, llama_config
from fedp2eft.core.methods import PersonalizeConfig, personalize
from fedp2eft.core.tasks import InstructionTask, rouge_l
from fedp2eft.errors import FedP2EFTError


@pytest.mark.parametrize("candidate, reference, expected", [
    ([1, 2, 3, 4], [1, 2, 3, 4], 1.0),
    ([1, 9, 3], [1, 2, 3, 4], 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)),  # LCS [1, 3]
    ([5, 6], [1, 2], 0.0),
    ([], [1], 0.0),
])
def test_rouge_l_matches_hand_computed_values(candidate, reference, expected):
    assert rouge_l(candidate, reference) == pytest.approx(expected)


def test_generation_metric_improves_when_the_model_learns_the_answers(tokenizer):
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(len(tokenizer)))
    task = InstructionTask(tokenizer, max_length=32, generation_tokens=4)
    train, test = instruction_examples(48, seed=1), instruction_examples(8, seed=2)
    untrained = task.evaluate(base, test)
    config = PersonalizeConfig(max_rank=8, epochs=8, batch_size=8, lora_lr=2e-2)
    trained = task.evaluate(personalize("lora", base, task, train, 8, config).model, test)
    assert 0.0 <= untrained["rouge_l"] < trained["rouge_l"] <= 1.0
    assert trained["rouge_l"] > 0.9
    assert untrained["exact_match"] == 0.0 and trained["exact_match"] >= 0.75  # whole answers, decoded and compared
    # every metric as (sum, count) for pooling over clients; the main one (ROUGE-L) first
    assert list(trained["scores"]) == ["rouge_l", "exact_match", "token_accuracy"]
    assert trained["scores"]["exact_match"] == (round(trained["exact_match"] * len(test)), len(test))
    assert trained["scores"]["rouge_l"][0] == pytest.approx(trained["rouge_l"] * len(test))


def test_evaluation_and_generation_run_in_inference_mode(tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(len(tokenizer)))
    task = InstructionTask(tokenizer, max_length=32, generation_tokens=2)
    modes = []
    handle = model.register_forward_pre_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    try:
        with torch.no_grad():
            plain = model(**task.collate(instruction_examples(4, seed=5))).logits
        metrics = task.evaluate(model, instruction_examples(4, seed=5))
    finally:
        handle.remove()
    assert modes[0] is False and len(modes) > 1 and all(modes[1:])
    assert metrics["count"] > 0 and "rouge_l" in metrics
    assert not plain.is_inference()
    assert torch.is_grad_enabled()  # evaluation leaves autograd as it found it


@pytest.mark.parametrize("method", ["lora", "fedp2eft-structure"])
def test_cached_generation_gives_the_uncached_tokens_through_every_wrapper(tokenizer, method):
    """The key/value cache changes the cost of greedy decoding, never its tokens (plain model, PEFT LoRA and the
    BT-LoRA wrapper with gates)."""
    from test_core_methods import artifact_for

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(len(tokenizer)))
    task = InstructionTask(tokenizer, max_length=32, generation_tokens=6)
    config = PersonalizeConfig(max_rank=8, epochs=1, batch_size=8, lora_lr=2e-2)
    model = personalize(method, base, task, instruction_examples(16, seed=1), 4, config,
                        artifact_for(method, base)).model
    for candidate in (base, model):
        for example in instruction_examples(3, seed=9):
            assert task.generate(candidate, example["instruction"]) == \
                task.generate(candidate, example["instruction"], use_cache=False)
    fed = []
    handle = base.register_forward_pre_hook(lambda _m, _a, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                            with_kwargs=True)
    try:
        task.generate(base, "what is the color of sun")
    finally:
        handle.remove()
    assert fed[0] > 1 and fed[1:] and all(width == 1 for width in fed[1:])  # the prompt once, then one token a step


def test_a_long_response_is_cut_at_its_end_never_dropped(tokenizer):
    task = InstructionTask(tokenizer, max_length=16)
    example = {"instruction": "what is the color of sun", "response": " ".join(["yellow"] * 40)}
    batch = task.collate([example])
    prompt = len(task.prompt_ids(example["instruction"]))
    assert batch["input_ids"].shape[1] == 16
    trained = int(task.loss_units(batch)[0])
    assert trained == 16 - prompt > 0  # every position after the prompt keeps a response token


def test_a_prompt_without_room_for_the_response_is_refused(tokenizer):
    task = InstructionTask(tokenizer, max_length=8)
    long_instruction = " ".join(["sun"] * 20)
    with pytest.raises(FedP2EFTError, match=r"example 1: its prompt alone is \d+ tokens and max_length is 8"):
        task.check([{"instruction": "sun", "response": "yellow"}, {"instruction": long_instruction,
                                                                   "response": "yellow"}], "client x")
    with pytest.raises(FedP2EFTError, match="needs a non-empty 'instruction' and 'response'"):
        task.check([{"instruction": "sun"}], "client x")


def test_an_encoder_checkpoint_is_refused_for_instruction_tuning(tmp_path, tokenizer):
    from conftest import LABELS, bert_config
    from fedp2eft.core.modeling import classifier_from_config, load_causal_lm

    classifier_from_config(bert_config(len(tokenizer)), LABELS).save_pretrained(tmp_path / "encoder")
    with pytest.raises(FedP2EFTError, match="not a decoder: instruction datasets need a causal language model"):
        load_causal_lm(tmp_path / "encoder")
    LlamaForCausalLM(llama_config(len(tokenizer))).save_pretrained(tmp_path / "decoder")
    assert isinstance(load_causal_lm(tmp_path / "decoder"), LlamaForCausalLM)


def test_batched_generation_gives_every_prompt_the_tokens_it_gets_alone(tokenizer):
    """Prompts of different lengths, left-padded in one batch, decode exactly what each decodes alone, with and
    without the cache, through the plain model, a PEFT LoRA, the BT-LoRA wrapper, and every run of a multi-run
    model (each run against its exported PEFT adapter)."""
    from test_core_methods import artifact_for

    from fedp2eft.core.multi_lora import LoRARun, MultiLoRAModel
    from fedp2eft.core.training import train as fit

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(len(tokenizer)))
    task = InstructionTask(tokenizer, max_length=32, generation_tokens=6)
    config = PersonalizeConfig(max_rank=8, epochs=1, batch_size=8, lora_lr=2e-2)
    train = instruction_examples(16, seed=1)
    prompts = [e["instruction"] + " now" * (i % 3) for i, e in enumerate(instruction_examples(5, seed=9))]
    assert len({len(task.prompt_ids(p)) for p in prompts}) > 1  # padding really happens
    models = [base] + [personalize(method, base, task, train, 4, config, artifact_for(method, base)).model
                       for method in ("lora", "fedp2eft-structure")]
    for model in models:
        alone = [task.generate(model, prompt) for prompt in prompts]
        assert task.generate_batch(model, prompts) == [alone]
        assert task.generate_batch(model, prompts, use_cache=False) == [alone]
    names = [n for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))]
    runs = [LoRARun({name: rank for name in names}, 5e-2, seed) for rank, seed in ((2, 0), (4, 1))]
    multi = MultiLoRAModel(base, task, runs)
    assert fit(multi, task, train, multi.optimizer(), 2, 8).steps == 4
    together = task.generate_batch(multi, prompts)
    for run in range(len(runs)):
        exported = multi.export(run)
        assert together[run] == [task.generate(exported, prompt) for prompt in prompts], run
    assert together[0] != together[1]  # two trained runs that decode differently: the rows did not mix
    single = MultiLoRAModel(base, task, runs[:1])  # a pass can hold one run (the last of a client's runs)
    assert fit(single, task, train, single.optimizer(), 1, 8).steps == 2
    assert task.generate_batch(single, prompts) == [[task.generate(single.export(0), prompt) for prompt in prompts]]
