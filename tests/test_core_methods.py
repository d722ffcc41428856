import copy
from dataclasses import replace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedp2eft.core.methods import METHODS, ClientContext, PersonalizeConfig, generator_spec, method_lr, personalize, \
    personalize_config
from fedp2eft.core.generator import PSGenerator
from fedp2eft.errors import FedP2EFTError

FAST = personalize_config(dict(max_rank=8, epochs=6, batch_size=8, lora_lr=1e-2, scale_lr=5e-2, adalora_lr=5e-2,
                              bayestune_epochs=3))


def trained_like_generator(base, seed=0) -> PSGenerator:
    """A generator whose outputs vary across ranks, as a trained one's do."""
    torch.manual_seed(seed)
    generator = PSGenerator(generator_spec(base, FAST, "tiny"))
    with torch.no_grad():
        generator.net[-1].bias.uniform_(0.2, 1.5)
    return generator


def artifact_for(method: str, base):
    """What the method's federated stage would have produced: a PS generator, FedL2P's meta-nets per budget, or a
    budget-heterogeneous peer's rank-R LoRA."""
    from fedp2eft.core.methods.fedl2p.metanet import LRMetaNet, metanet_spec

    stage = METHODS[method].stage
    if stage is None:
        return None
    if stage.name in ("nested", "hetlora", "flexlora"):  # a rank-R adapter as a peer's stage starts it (B = 0)
        from fedp2eft.core.methods.nested_lora.task import NestedLoRATask
        from fedp2eft.core.prefix_lora import PeerConfig, from_weights

        return from_weights(NestedLoRATask(base, None, [], PeerConfig(personalize=FAST), "tiny").initial_weights())
    if stage.name == "fedl2p":
        return {b: LRMetaNet(metanet_spec(base, FAST, "tiny", b), base_lr=FAST.lora_lr) for b in (2, 4)}
    return trained_like_generator(base)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_runs_end_to_end_and_reduces_training_loss(setup, method):
    base, task, train, test = setup
    reference = copy.deepcopy(base.state_dict())
    before = task.evaluate(base, train)["loss"]
    result = personalize(method, base, task, train, budget=4, config=FAST, artifact=artifact_for(method, base))
    after = task.evaluate(result.model, train)["loss"]
    assert after < 0.95 * before, (method, before, after)
    assert set(task.evaluate(result.model, test)) >= {"loss", "count"}
    assert result.metrics["steps"] == FAST.epochs * 6
    modules = len(generator_spec(base, FAST, "tiny").module_names)
    if method == "adalora":  # the budget allocation pruned from init_r (6) down to target_r (4) on average
        assert 0 < sum(result.ranks.values()) <= 4 * modules < 6 * modules
    for key, value in base.state_dict().items():  # the base model is never modified
        assert torch.equal(value, reference[key])


@pytest.mark.parametrize("method", ["btlora", "fedp2eft", "fedp2eft-structure"])
def test_budget_methods_respect_the_budget_and_export(setup, method, tmp_path):
    base, task, train, _ = setup
    generator = trained_like_generator(base) if METHODS[method].stage is not None else None
    result = personalize(method, base, task, train, budget=2, config=FAST, artifact=generator)
    modules = len(generator_spec(base, FAST, "tiny").module_names)
    assert sum(result.ranks.values()) == 2 * modules
    x = task.collate(train[:4])
    gated = result.model(**x).logits.detach()
    result.export(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert torch.allclose(loaded(**x).logits, gated, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_exported_adapter_carries_the_head(tokenizer, method, tmp_path):
    """The adapter holds the base model's head (frozen while personalizing), so loaded onto the plain encoder with
    any other head it predicts bit-identically to the personalized model (AdaLoRA's to rounding: PEFT loads it cut to
    the ranks it kept)."""
    from conftest import LABELS, bert_config, classification_examples
    from fedp2eft.core.modeling import classifier_from_config
    from fedp2eft.core.tasks import ClassificationTask

    base = classifier_from_config(bert_config(len(tokenizer)), LABELS).eval()
    task = ClassificationTask(tokenizer, LABELS, max_length=32)
    train = classification_examples(24, seed=1)
    quick = replace(FAST, epochs=1, bayestune_epochs=1)
    result = personalize(method, base, task, train, budget=2, config=quick, artifact=artifact_for(method, base))
    result.export(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    head = {key.rsplit(".", 1)[-1]: value for key, value in saved.items() if ".head." in key}
    assert torch.equal(head["weight"], base.head.weight) and torch.equal(head["bias"], base.head.bias)
    plain = copy.deepcopy(base)
    torch.nn.init.normal_(plain.head.weight)  # the encoder with a head the adapter must replace
    loaded = PeftModel.from_pretrained(plain, str(tmp_path)).eval()
    batch = task.collate(train[:8])
    with torch.no_grad():
        reloaded, personalized = loaded(**batch).logits, result.model.eval()(**batch).logits
    if method == "adalora":  # PEFT loads it resized to its kept ranks: shorter sums, rounding of a few ulps
        torch.testing.assert_close(reloaded, personalized, rtol=0,
                                   atol=8 * torch.finfo(torch.float32).eps * float(personalized.abs().max()))
    else:
        assert torch.equal(reloaded, personalized)


def test_bad_inputs_are_refused(setup, tmp_path):
    base, task, train, _ = setup
    with pytest.raises(FedP2EFTError, match="1 <= r <= R=8"):
        personalize("lora", base, task, train, budget=16, config=FAST)
    with pytest.raises(FedP2EFTError, match="unknown method 'lorax'"):
        personalize("lorax", base, task, train, budget=2, config=FAST)
    with pytest.raises(FedP2EFTError, match="is empty"):
        personalize("lora", base, task, [], budget=2, config=FAST)
    with pytest.raises(FedP2EFTError, match="needs a trained PS generator"):
        personalize("fedp2eft", base, task, train, budget=2, config=FAST)
    other = PSGenerator(generator_spec(base, PersonalizeConfig(max_rank=16), "tiny"))
    with pytest.raises(FedP2EFTError, match="does not fit"):
        personalize("fedp2eft", base, task, train, budget=2, config=FAST, artifact=other)


def test_label_outside_label_set_is_refused(tokenizer):
    from conftest import LABELS, bert_config, classification_examples
    from fedp2eft.core.modeling import classifier_from_config
    from fedp2eft.core.tasks import ClassificationTask

    task = ClassificationTask(tokenizer, LABELS)
    bad = classification_examples(4, seed=0) + [{"text": "cat", "label": 7}]
    with pytest.raises(FedP2EFTError, match="example 4: label 7 is not in the model's label set"):
        personalize("lora", classifier_from_config(bert_config(len(tokenizer)), LABELS), task, bad, 2, FAST)


def test_structure_variant_keeps_the_ranks_and_sets_lambdas_to_one(setup):
    base, task, train, _ = setup
    context = ClientContext(base, task, train, {"psg": trained_like_generator(base)})
    full = personalize("fedp2eft", context, budget=2, config=FAST)
    structure = personalize("fedp2eft-structure", context, budget=2, config=FAST)
    assert structure.ranks == full.ranks
    assert all(v == 1.0 for values in structure.report["lambdas"].values() for v in values)
    kept = [v for values in full.report["lambdas"].values() for v in values]
    assert min(kept) > 0.2 and max(kept) != min(kept)  # the generator's values, which vary


def bayestune_searches(context: ClientContext) -> list:
    return [key for key in context._shared if key[0] == "bayestune"]


def test_a_client_context_shares_work_between_budgets_without_changing_results(setup):
    """Features, generator output and the BayesTune search are computed once per client; results are those of
    separate runs, to the bit, also with dropout on (the fine-tuning's random state must not depend on whether the
    search ran just before it)."""
    base, task, train, test = setup
    base = copy.deepcopy(base)
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    context = ClientContext(base, task, train, {"psg": trained_like_generator(base)})
    shared = [personalize("btlora", context, budget=b, config=FAST) for b in (2, 4)]
    assert len(bayestune_searches(context)) == 1
    alone = personalize("btlora", base, task, train, budget=4, config=FAST)
    assert alone.ranks == shared[1].ranks
    assert alone.metrics == shared[1].metrics
    assert task.evaluate(alone.model, test)["loss"] == task.evaluate(shared[1].model, test)["loss"]
    personalize("btlora", context, budget=2, config=FAST.with_lr_scale(0.5))  # another search setting
    assert len(bayestune_searches(context)) == 2


def test_adalora_keeps_peft_default_alpha(setup):
    base, task, train, _ = setup
    result = personalize("adalora", base, task, train, budget=4, config=FAST)
    config = result.model.peft_config["default"]
    assert config.lora_alpha == 8 and config.init_r == 6  # scaling alpha/init_r, as the reference runs it


def test_lr_scale_keeps_the_paper_ratios():
    scaled = PersonalizeConfig().with_lr_scale(10)
    assert (scaled.lora_lr, scaled.scale_lr, method_lr(scaled, "adalora")) == pytest.approx((1e-3, 1e-1, 1e-2))
    configured = personalize_config({"adalora_lr": 2e-3}).with_lr_scale(10)  # a method's own rate, set and scaled
    assert method_lr(configured, "adalora") == pytest.approx(2e-2) and configured.lora_lr == pytest.approx(1e-3)


def test_every_method_declares_a_known_learning_rate_and_stage_loads_refuse_foreign_files(setup, tmp_path):
    from fedp2eft.core.methods import STAGES, method_lr, method_spec

    config = PersonalizeConfig()
    assert {name: method_lr(config, name) for name in ("lora", "adalora")} == {"lora": 1e-4, "adalora": 1e-3}
    assert method_spec("fedp2eft").stage is method_spec("fedp2eft-structure").stage is STAGES["psg"]
    with pytest.raises(FedP2EFTError, match="unknown method 'nope'; choose one of: lora, adalora"):
        method_spec("nope")
    with pytest.raises(FedP2EFTError, match="no PS generator at"):
        STAGES["psg"].load(tmp_path / "missing.safetensors", setup[0], config, "tiny")


def test_fedl2p_plugs_in_and_asks_for_its_meta_nets(setup, tmp_path):
    from fedp2eft.core.methods import STAGES
    from fedp2eft.core.methods.fedl2p.metanet import LRMetaNet, metanet_spec

    base, task, train, _ = setup
    assert METHODS["fedl2p"].stage is STAGES["fedl2p"] and METHODS["fedl2p"].lr_field is None
    with pytest.raises(FedP2EFTError, match="method 'fedl2p' needs trained FedL2P meta-nets"):
        personalize("fedl2p", base, task, train, budget=2, config=FAST)
    metanets = {4: LRMetaNet(metanet_spec(base, FAST, "tiny", 4), base_lr=FAST.lora_lr)}
    with pytest.raises(FedP2EFTError, match=r"no FedL2P meta-net for budget r=2 \(there are meta-nets for r in \[4\]\)"):
        personalize("fedl2p", base, task, train, budget=2, config=FAST, artifact=metanets)
    result = personalize("fedl2p", base, task, train, budget=4, config=FAST, artifact=metanets)
    assert result.report["mean_lr"] == pytest.approx(FAST.lora_lr, rel=0.05)
    with pytest.raises(FedP2EFTError, match="no FedL2P meta-nets"):
        STAGES["fedl2p"].load(tmp_path, base, FAST, "tiny")
    metanets[4].save(tmp_path / "fedl2p-r4.safetensors")
    assert list(STAGES["fedl2p"].load(tmp_path, base, FAST, "tiny")) == [4]


@pytest.mark.parametrize("method", ["lora", "fedp2eft", "fedp2eft-structure"])
def test_rank_lr_exponent_fine_tunes_at_the_rate_of_the_budget(setup, method):
    """With rank_lr_exponent 1, budget 4 fine-tunes at lora_lr x 2/4: the same run, to the bit, as halving lora_lr
    by hand; the batched path's run gets that rate too."""
    from fedp2eft.core.methods import personalize_many

    base, task, train, test = setup
    artifact = artifact_for(method, base)
    scaled_config = replace(FAST, rank_lr_exponent=1.0)
    scaled = personalize(method, base, task, train, budget=4, config=scaled_config, artifact=artifact)
    by_hand = personalize(method, base, task, train, budget=4, config=replace(FAST, lora_lr=FAST.lora_lr / 2),
                          artifact=artifact)
    plain = personalize(method, base, task, train, budget=4, config=FAST, artifact=artifact)
    assert scaled.metrics == by_hand.metrics != plain.metrics
    assert task.evaluate(scaled.model, test)["loss"] == task.evaluate(by_hand.model, test)["loss"]
    [batched] = personalize_many(ClientContext(base, task, train, {"psg": artifact}), [(method, 4, scaled_config)])
    assert batched.model.runs[batched.run].lr == FAST.lora_lr / 2


def test_rank_lr_exponent_leaves_the_bayestune_search_alone(setup):
    """BayesTune's search runs at lora_lr whatever the exponent (one search for every budget); at the reference
    rank 2 the fine-tuning is the exponent-free one, to the bit."""
    base, task, train, _ = setup
    scaled_config = replace(FAST, rank_lr_exponent=1.0)
    context = ClientContext(base, task, train)
    at_two = personalize("btlora", context, budget=2, config=scaled_config)
    personalize("btlora", context, budget=4, config=scaled_config)
    assert len(bayestune_searches(context)) == 1
    plain_two = personalize("btlora", base, task, train, budget=2, config=FAST)
    assert at_two.metrics == plain_two.metrics and at_two.ranks == plain_two.ranks
    assert PersonalizeConfig(lora_lr=1e-3, rank_lr_exponent=1.0).finetune_lr(16) == pytest.approx(1.25e-4)


def test_a_method_registry_refuses_a_second_name_and_a_setting_two_methods_would_read():
    from dataclasses import dataclass

    from fedp2eft.core.methods import MethodSpec, by_name

    lora = METHODS["lora"]
    with pytest.raises(FedP2EFTError, match="two methods are called 'lora'"):
        by_name([lora, lora])

    @dataclass
    class Clash:
        adalora_lr: float = 1.0

    with pytest.raises(FedP2EFTError, match=r"personalize\.adalora_lr, which method 'adalora' already reads"):
        by_name([METHODS["adalora"], MethodSpec("other", lora.personalize, settings=Clash)])

    @dataclass
    class Shared:
        lora_lr: float = 1.0

    with pytest.raises(FedP2EFTError, match=r"personalize\.lora_lr, which every method already reads"):
        by_name([MethodSpec("other", lora.personalize, settings=Shared)])
    with pytest.raises(FedP2EFTError, match="unknown key.*adalora_lrr.*known keys: .*adalora_lr"):
        personalize_config({"adalora_lrr": 1e-3})
