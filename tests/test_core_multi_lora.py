"""Many runs of a client in one pass (core/multi_lora.py) equal the same runs trained one at a time, and a run
exports to a standard PEFT adapter that reproduces its predictions. The tiny models have no dropout, so the two
paths may differ by float rounding only."""

import dataclasses
import math

import pytest
import torch
from peft import PeftModel

from conftest import TRAINED_LOSS_REL, adam_rounding_tolerance
from fedp2eft.core.methods import ClientContext, PersonalizeConfig, evaluate_many, method_lr, personalize, \
    personalize_many
from fedp2eft.core.methods.btlora import bayestune_scales, search_key
from fedp2eft.core.btlora import LORA_SCALING, attach_lora
from fedp2eft.core.multi_lora import LoRARun, MultiLoRAModel, peft_init
from fedp2eft.core.personalization import frozen_copy, runs_per_pass
from test_core_methods import artifact_for, trained_like_generator

CONFIG = PersonalizeConfig(max_rank=8, epochs=2, batch_size=8, lora_lr=1e-2, scale_lr=5e-2, bayestune_epochs=2)
# every LoRA-shaped method at two budgets, each at its own learning-rate scale: runs of different ranks per
# module and learning rates in one pass, fixed or unit multipliers, and two BayesTune searches (one per scale) that
# train lambda under the priors
CELLS = [(method, budget, CONFIG.with_lr_scale(scale))
         for method in ("lora", "adalora", "btlora", "fedp2eft", "fedp2eft-structure", "fedl2p")
         for budget, scale in ((2, 1.0), (4, 3.0))]


def lora_weights(model) -> dict[str, torch.Tensor]:
    """A PEFT model's LoRA tensors by name (multipliers folded into B)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def loss_drift_bound(model, task, examples, moved: dict[str, torch.Tensor]) -> float:
    """How far the mean loss of ``model`` over ``examples`` may move when its adapter tensors move to ``moved``: to
    first order by sum |dL/dw| |w' - w| (the triangle inequality over every weight), doubled for the curvature and
    for the last epoch's earlier weights, at which a training loss is read, plus float32 rounding of the mean."""
    model.eval()  # the sensitivity of the function trained, without dropout's noise
    parameters = dict(model.named_parameters())
    weights = [parameters[name] for name in moved]
    for weight in weights:
        weight.requires_grad_(True)
    batch = task.collate(examples)
    loss = model(**batch).loss
    gradients = torch.autograd.grad(loss, weights)
    first_order = sum(float((g.abs() * (moved[name] - w.detach()).abs()).sum())
                      for name, g, w in zip(moved, gradients, weights))
    return 2 * first_order + 1e-6 * loss.item()


def separate(base, task, train, method, budget, config, artifact):
    """One run trained alone: its result and its PEFT model (multipliers folded into B)."""
    result = personalize(method, base, task, train, budget=budget, config=config, artifact=artifact)
    return result, result.model.fold_scales() if hasattr(result.model, "fold_scales") else result.model


def test_a_batch_of_runs_equals_the_runs_one_at_a_time(setup):
    base, task, train, test = setup
    generator = trained_like_generator(base)
    metanets = artifact_for("fedl2p", base)  # per-tensor learning rates
    context = ClientContext(base, task, train, {"psg": generator, "fedl2p": metanets})
    batched = personalize_many(context, CELLS)
    passes = len({id(result.model) for result in batched})
    assert passes == -(-len(CELLS) // runs_per_pass(context, CONFIG.batch_size))  # as few passes as memory allows
    scores = evaluate_many(task, batched, test)  # each pass's runs scored together
    for (method, budget, config), result, score in zip(CELLS, batched, scores):
        alone, peft_alone = separate(base, task, train, method, budget, config,
                                     metanets if method == "fedl2p" else generator)
        weights = lora_weights(peft_alone)
        assert result.ranks == alone.ranks, method
        assert result.report.keys() == alone.report.keys()
        # btlora's multipliers come out of a search whose lambda trains at scale_lr (then rounded to 6 digits)
        search_steps = config.bayestune_epochs * -(-len(train) // config.batch_size)
        search = adam_rounding_tolerance(config.scale_lr, search_steps) + 1e-6
        for name, values in alone.report.get("lambdas", {}).items():
            assert result.report["lambdas"][name] == pytest.approx(values, abs=search), (method, name)
        assert result.metrics["steps"] == alone.metrics["steps"]
        assert result.metrics["trainable_parameters"] == alone.metrics["trainable_parameters"]
        exported_model = result.model.export(result.run)
        exported = lora_weights(exported_model)
        assert exported.keys() == weights.keys() and weights, method
        rates = result.model.runs[result.run].tensor_lrs  # FedL2P: one learning rate per tensor, the largest bounds
        lr = max(max(pair) for pair in rates.values()) if rates else method_lr(config, method)
        tolerance = adam_rounding_tolerance(lr, result.metrics["steps"])
        fold = max([1.0] + [v for values in result.report.get("lambdas", {}).values() for v in values])
        for name in weights:  # lambda is fixed while fine-tuning; folded into B it scales B's tolerance
            torch.testing.assert_close(exported[name], weights[name], atol=tolerance * fold, rtol=0,
                                       msg=f"{method} r={budget} {name}")
        # the training losses differ by what the weights' rounding drift (held to Adam's bound above) can move them
        drift = loss_drift_bound(peft_alone, task, train, exported)
        assert abs(result.metrics["train_loss_last_epoch"] - alone.metrics["train_loss_last_epoch"]) <= drift, method
        # scoring all runs in one pass equals scoring the run's own adapter alone: the same weights, so float
        # rounding of the logits only (~1e-6 relative, as in the export test below)
        evaluated = task.evaluate(exported_model, test)
        assert score["loss"] == pytest.approx(evaluated["loss"], rel=1e-4), method
        assert score["count"] == evaluated["count"]


def test_batched_bayestune_searches_equal_separate_searches(setup):
    base, task, train, _ = setup
    configs = [CONFIG, CONFIG.with_lr_scale(3.0)]
    batched_context = ClientContext(base, task, train)
    personalize_many(batched_context, [("btlora", 2, config) for config in configs])
    for config in configs:
        batched_scales, batched_names, batched_loss = batched_context.shared(search_key(config), None)
        scales, names, loss = bayestune_scales(ClientContext(base, task, train), config)
        assert batched_names == names
        assert batched_loss == pytest.approx(loss, rel=TRAINED_LOSS_REL)
        steps = config.bayestune_epochs * -(-len(train) // config.batch_size)
        torch.testing.assert_close(batched_scales, scales, rtol=0,
                                   atol=adam_rounding_tolerance(config.scale_lr, steps))


def test_an_exported_run_reproduces_its_predictions_as_a_saved_peft_adapter(setup, tmp_path):
    base, task, train, test = setup
    generator = trained_like_generator(base)
    context = ClientContext(base, task, train, {"psg": generator})
    results = personalize_many(context, [("fedp2eft", 2, CONFIG), ("lora", 4, CONFIG), ("adalora", 2, CONFIG)])
    model = results[0].model
    batch = task.collate(test[:6])
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits.view(model.run_count, len(test[:6]), *model(**inputs).logits.shape[1:])
    for result in results:
        result.export(tmp_path / f"run{result.run}")
        loaded = PeftModel.from_pretrained(frozen_copy(base), str(tmp_path / f"run{result.run}")).eval()
        with torch.no_grad():
            reloaded = loaded(**inputs).logits
        # the same function computed in another order of float operations: rounding of ~1e-6 of the logits' size
        torch.testing.assert_close(reloaded, logits[result.run], rtol=1e-4, atol=1e-5 * float(logits.abs().max()))
    assert not torch.allclose(logits[0], logits[1])  # two different runs, not one copied


def test_runs_with_different_ranks_per_module_pad_without_leaking(setup):
    """A run with no LoRA in a module, next to one with LoRA there, computes exactly the base model's output
    there: padded ranks are gated to 0 and get no gradient."""
    base, task, train, _ = setup
    names = [name for name, module in base.named_modules() if isinstance(module, torch.nn.Linear)
             and name in trained_like_generator(base).spec.module_names]
    runs = [LoRARun({names[0]: 4}, lr=1e-2, seed=0), LoRARun({names[1]: 2}, lr=1e-2, seed=0)]
    model = MultiLoRAModel(base, task, runs)
    layer = model.layers[names[0]]
    assert layer.a[1].shape[0] == 0 and not layer.a[1].requires_grad
    with torch.no_grad():
        layer.b[0].normal_()
    x = torch.randn(2 * 3, 5, layer.base.in_features)
    out = layer(x)
    torch.testing.assert_close(out[3:], layer.base(x[3:]), rtol=0, atol=0)
    assert not torch.allclose(out[:3], layer.base(x[:3]))


def test_a_reused_lora_init_is_the_one_peft_draws(setup):
    """The init drawn once per layout and reused is bit for bit PEFT's own for those ranks and that seed, also after
    another layout was drawn in between (which moves the global random stream), and it differs by seed."""
    base, _, _, _ = setup
    names = trained_like_generator(base).spec.module_names[:3]
    ranks = {name: rank for name, rank in zip(names, (2, 4, 1))}
    first = peft_init(base, ranks, seed=5)
    peft_init(base, {names[0]: 3}, seed=7)
    again = peft_init(base, dict(reversed(list(ranks.items()))), seed=5)
    fresh = dict(attach_lora(frozen_copy(base), ranks, LORA_SCALING, seed=5).base_model.model.named_modules())
    for name in names:
        torch.testing.assert_close(again[name][0], fresh[name].lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(again[name][1], fresh[name].lora_B["default"].weight, rtol=0, atol=0)
        assert again[name][0] is first[name][0]
    assert not torch.equal(peft_init(base, ranks, seed=6)[names[0]][0], first[names[0]][0])


def test_runs_with_dropout_see_the_masks_a_separate_run_draws(tokenizer):
    """With hidden and attention dropout on, each run of a batch draws the masks its separate run draws (one
    mask per batch, shared by the runs), so batched and separate training still agree to rounding."""
    from conftest import LABELS, bert_config, classification_examples
    from fedp2eft.core.modeling import classifier_from_config
    from fedp2eft.core.tasks import ClassificationTask

    config = bert_config(len(tokenizer))
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.3
    base = classifier_from_config(config, LABELS)
    task = ClassificationTask(tokenizer, LABELS, max_length=32)
    train = classification_examples(32, seed=1)
    cells = [("lora", 2, CONFIG), ("lora", 4, CONFIG.with_lr_scale(3.0)), ("adalora", 2, CONFIG)]
    batched = personalize_many(ClientContext(base, task, train), cells)
    for (method, budget, config), result in zip(cells, batched):
        alone, peft_alone = separate(base, task, train, method, budget, config, None)
        weights = lora_weights(peft_alone)
        exported = lora_weights(result.model.export(result.run))
        tolerance = adam_rounding_tolerance(method_lr(config, method), result.metrics["steps"])
        for name in weights:
            torch.testing.assert_close(exported[name], weights[name], atol=tolerance, rtol=0, msg=name)
        drift = loss_drift_bound(peft_alone, task, train, exported)
        assert abs(result.metrics["train_loss_last_epoch"] - alone.metrics["train_loss_last_epoch"]) <= drift, method


def test_a_pass_keeps_every_tensor_on_the_models_device_and_views_on_the_stacked_storage(setup):
    """The GPU path without a GPU: on the meta device, which refuses to mix with CPU tensors, a step (forward,
    BayesTune prior, backward, optimizer) creates nothing on the CPU; after a move or cast each run's tensors are
    still views of the stacked storage, so the optimizer's updates reach the pass."""
    base, task, _, _ = setup
    names = trained_like_generator(base).spec.module_names
    runs = [LoRARun(dict.fromkeys(names, 2), lr=1e-2, seed=0),
            LoRARun({names[0]: 4}, lr=1e-2, seed=0, scales={names[0]: torch.full((4,), 1e-4)}, scale_lr=1e-2)]
    model = MultiLoRAModel(base, task, runs)
    optimizer = model.optimizer()
    layer = model.layers[names[0]]
    model.double()
    assert layer.a[1].data_ptr() == layer.a_all[1].data_ptr() and layer.a[1].dtype == torch.float64
    model.float().to("meta")
    assert {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()} == {"meta"}
    x = torch.randn(2 * 3, 5, layer.base.in_features, device="meta")
    (layer(x).sum() + model.prior_loss(4)).backward()
    optimizer.step()
    assert layer.a[0].device.type == "meta" and layer.a_all.grad is None  # handed over, then cleared


def test_every_batched_method_trains_and_scores_in_bf16_mixed_precision(setup):
    """Under bf16 the batched pass multiplies in bf16 (its stacked layers' outputs are bf16) while every trained
    tensor stays float32, and a run's exported PEFT adapter, scored alone in bf16, gives the batched score up to
    bf16 rounding: 8 significant bits, a relative 2^-9 per matmul output, compounding over the tiny models' ~10
    chained matmuls to ~2% of a logit; a mean loss may move as much, so 4% with margin."""
    base, task, train, test = setup
    task = dataclasses.replace(task, precision="bf16")
    context = ClientContext(base, task, train, {"psg": trained_like_generator(base),
                                                "fedl2p": artifact_for("fedl2p", base)})
    batched = personalize_many(context, CELLS)
    outputs: set[torch.dtype] = set()
    models = {id(result.model): result.model for result in batched}.values()
    handles = [layer.register_forward_hook(lambda _m, _i, out: outputs.add(out.dtype))
               for model in models for layer in model.layers.values()]
    scores = evaluate_many(task, batched, test)
    for handle in handles:
        handle.remove()
    assert outputs == {torch.bfloat16}
    for (method, budget, _), result, score in zip(CELLS, batched, scores):
        assert {p.dtype for p in result.model.parameters()} == {torch.float32}, method
        assert math.isfinite(result.metrics["train_loss_last_epoch"]), method
        alone = task.evaluate(result.model.export(result.run), test)
        assert score["loss"] == pytest.approx(alone["loss"], rel=0.04), (method, budget)
