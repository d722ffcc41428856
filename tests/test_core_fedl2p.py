"""FedL2P (Lee et al., NeurIPS 2023): the IFT/Neumann hypergradient, the learning-rate meta-net, its meta-training,
its file format, its federated job and its personalization (docs/method.md, "Baselines")."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from conftest import LABELS, TRAINED_LOSS_REL, adam_rounding_tolerance, bert_config, classification_examples
from fedp2eft.core import training
from fedp2eft.core.methods.fedl2p.meta_training import FedL2PConfig, FedL2PTask, implicit_hypergradient, meta_update, \
    rate_run, validation_hypergradient
from fedp2eft.core.methods.fedl2p.metanet import LRMetaNet, MetaNetSpec, lora_tensors, metanet_file, metanet_spec, \
    new_lora, personalize_fedl2p
from fedp2eft.core.generator import GeneratorSpec, PSGenerator
from fedp2eft.core.methods import ClientContext, PersonalizeConfig, features_for
from fedp2eft.core.personalization import validation_split
from fedp2eft.core.modeling import classifier_from_config
from fedp2eft.core.multi_lora import MultiLoRAModel
from fedp2eft.core.tasks import ClassificationTask
from fedp2eft.errors import FedP2EFTError

SPEC = MetaNetSpec("tiny", tuple(f"layer.{i}" for i in range(6)), 4, tuple(f"layer.{i}" for i in range(7)))
FAST = PersonalizeConfig(max_rank=8, epochs=6, batch_size=8, lora_lr=1e-2)


@pytest.fixture(autouse=True)
def one_thread():
    """Double-backward passes of tiny models are dominated by thread hand-offs on a busy machine; one thread keeps
    this file fast and changes no result."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the hypergradient ---------------------------------------------------------------------------------------------


def ridge_problem():
    """Ridge regression with one penalty per coordinate, h: L_train = mean (X theta - y)^2 + sum h_i theta_i^2.
    The penalties move the fixed point theta*(h), which is known in closed form, so dL_val(theta*(h))/dh has an
    accurate finite-difference reference."""
    generator = torch.Generator().manual_seed(0)
    d, n = 5, 40
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(d, generator=generator, dtype=torch.float64) + 0.1 * torch.randn(
        n, generator=generator, dtype=torch.float64)
    x_val = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y_val = x_val @ torch.randn(d, generator=generator, dtype=torch.float64)
    eta = 0.2  # eigenvalues of eta * Hessian lie in (0.28, 0.64): the Neumann series converges for step 1

    def solve(h):
        return torch.linalg.solve(2 * x.T @ x / n + 2 * torch.diag(h), 2 * x.T @ y / n)

    def val_loss(theta):
        return ((x_val @ theta - y_val) ** 2).mean()

    def update(params, hparams):
        (theta,), (h,) = params, hparams
        loss = ((x @ theta - y) ** 2).mean() + (h * theta * theta).sum()
        (grad,) = torch.autograd.grad(loss, [theta], create_graph=True)
        return [theta - eta * grad]

    return solve, val_loss, update


def test_neumann_hypergradient_matches_finite_differences():
    solve, val_loss, update = ridge_problem()
    h = torch.full((5,), 0.3, dtype=torch.float64)
    theta = solve(h).requires_grad_(True)
    assert torch.allclose(update([theta], [h])[0], theta, atol=1e-12)  # theta is the fixed point of Phi
    (v,) = torch.autograd.grad(val_loss(theta), [theta])
    eps = 1e-6
    reference = torch.stack([(val_loss(solve(h + eps * e)) - val_loss(solve(h - eps * e))) / (2 * eps)
                             for e in torch.eye(5, dtype=torch.float64)])

    (converged,) = implicit_hypergradient(update, [theta], [h], [v], terms=2000, step=1.0)
    assert converged.shape == h.shape
    # tolerance: 1e-6 of the reference's norm (float64; finite differences alone are good to ~1e-9 here)
    assert (converged - reference).norm() <= 1e-6 * reference.norm()

    (default,) = implicit_hypergradient(update, [theta], [h], [v], terms=3, step=0.1)  # FedL2P's setting
    assert torch.equal(default.sign(), reference.sign())
    assert torch.nn.functional.cosine_similarity(default, reference, dim=0) > 0.95
    errors = [float((implicit_hypergradient(update, [theta], [h], [v], terms=k, step=1.0)[0] - reference).norm())
              for k in (0, 3, 30)]
    assert errors[0] > errors[1] > errors[2]  # more terms, closer to the exact inverse


# --- the meta-net --------------------------------------------------------------------------------------------------


def test_multipliers_start_at_one_whatever_the_features():
    torch.manual_seed(0)
    metanet = LRMetaNet(SPEC, base_lr=3e-4)
    assert metanet.net[0].in_features == 14 and metanet.net[-1].out_features == 12
    assert metanet.base_lrs.shape == (12,) and metanet.base_lrs.requires_grad
    for scale in (1.0, 10.0, 100.0):
        features = torch.randn(14) * scale
        multipliers = metanet(features)
        assert multipliers.shape == (12,)
        assert (multipliers - 1).abs().max() <= 0.05, scale
        assert torch.allclose(metanet.learning_rates(features), torch.full((12,), 3e-4), rtol=0.05)


def test_multipliers_are_clamped_with_a_straight_through_gradient():
    metanet = LRMetaNet(SPEC)
    with torch.no_grad():
        metanet.net[-1].bias.fill_(-3.0)
    multipliers = metanet(torch.zeros(14))
    assert torch.all(multipliers == 0)
    multipliers.sum().backward()
    assert torch.all(metanet.net[-1].bias.grad == 1)  # the clamp passes gradient, so a zeroed rate can recover


def test_lora_tensors_are_a_then_b_per_module_in_spec_order(tokenizer):
    torch.manual_seed(0)
    base = classifier_from_config(bert_config(len(tokenizer)), LABELS)
    spec = metanet_spec(base, FAST, "tiny", 2)
    model = new_lora(base, spec, seed=0)
    tensors = lora_tensors(model, spec.module_names)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(tensors) == spec.num_outputs == 2 * len(spec.module_names)
    for index, tensor in enumerate(tensors):
        module, part = spec.module_names[index // 2], "lora_A" if index % 2 == 0 else "lora_B"
        assert names[id(tensor)].endswith(f"{module}.{part}.default.weight"), names[id(tensor)]
    assert {id(t) for t in tensors} == {id(p) for p in model.parameters() if p.requires_grad}
    assert tensors[0].shape[0] == 2 and tensors[1].shape[1] == 2  # rank r = the spec's budget


# --- meta-training ---------------------------------------------------------------------------------------------------


def test_validation_split_is_seeded_disjoint_and_eighty_twenty():
    examples = [{"i": i} for i in range(50)]
    inner, validation = validation_split(examples, 0.2, 3)
    assert (len(inner), len(validation)) == (40, 10)
    assert sorted(e["i"] for e in inner + validation) == list(range(50))
    assert validation_split(examples, 0.2, 3) == (inner, validation)
    assert validation_split(examples, 0.2, 4) != (inner, validation)
    with pytest.raises(FedP2EFTError, match="at least 2"):
        validation_split(examples[:1], 0.2, 0)


def test_validation_split_holds_out_whole_groups():
    """Rows that share content (a ``group``) are never on both sides, and a fifth of the groups is held out."""
    examples = [{"i": i, "group": f"doc{i // 5}"} for i in range(50)] + [{"i": 50}]  # one row without a group
    for key in range(20):
        inner, validation = validation_split(examples, 0.2, key)
        assert sorted(e["i"] for e in inner + validation) == list(range(51))
        assert not {e.get("group") for e in inner} & {e.get("group") for e in validation} - {None}
        assert len({e.get("group", e["i"]) for e in validation}) == 2  # round(0.2 x 11 units)
    held = [validation_split(examples[:50], 0.2, key)[1][0]["group"] for key in (3, 9)]
    assert held[0] != held[1]  # the seed chooses the groups
    with pytest.raises(FedP2EFTError, match="at least 2 groups"):
        validation_split(examples[:5], 0.2, 0)


def test_meta_training_raises_useful_learning_rates_and_lowers_validation_loss(tokenizer):
    """A tiny BERT whose LoRA learns too slowly at lr 2e-3: the validation hypergradient must raise the learning
    rates, and fine-tuning with the learned rates must reach a lower validation loss than with the initial ones
    (same split, LoRA init and batch order). A hypergradient of the wrong sign lowers the rates and fails both."""
    torch.manual_seed(0)
    base = classifier_from_config(bert_config(len(tokenizer)), LABELS)
    task = ClassificationTask(tokenizer, LABELS, max_length=32)
    train = classification_examples(48, seed=1)
    inner = PersonalizeConfig(max_rank=8, epochs=1, batch_size=8, lora_lr=2e-3)
    config = FedL2PConfig(personalize=inner, meta_lr=2e-3, base_lr_lr=2e-4)
    spec = metanet_spec(base, inner, "tiny", 4)
    metanet = LRMetaNet(spec, base_lr=inner.lora_lr)
    features = features_for(base, task, train, spec)
    history = [meta_update([metanet], base, task, train, features, config, seed=3)[0] for _ in range(5)]
    first, last = history[0], history[-1]
    assert first["val_loss_before"] == pytest.approx(history[1]["val_loss_before"], abs=0.05)  # small steps
    assert last["mean_lr"] > 1.3 * inner.lora_lr
    assert last["val_loss_before"] < first["val_loss_before"] - 0.02, [h["val_loss_before"] for h in history]
    assert all(h["val_loss_before"] > h["val_loss_after"] for h in history)


def test_meta_nets_updated_together_equal_each_updated_alone(setup):
    """Every budget's meta-net in one pass per step (the federated job's client update) moves as it would alone:
    the batched fine-tunes and the one double backward over all runs are block diagonal over the runs."""
    base, task, train, _ = setup
    inner = PersonalizeConfig(max_rank=8, epochs=1, batch_size=8, lora_lr=1e-2)
    config = FedL2PConfig(personalize=inner, outer_steps=2, meta_lr=1e-3, base_lr_lr=1e-4)
    budgets = (2, 4, 8)

    def fresh() -> list[LRMetaNet]:
        torch.manual_seed(5)
        return [LRMetaNet(metanet_spec(base, inner, "tiny", budget), base_lr=inner.lora_lr) for budget in budgets]

    features = features_for(base, task, train, metanet_spec(base, inner, "tiny", 2))
    together = fresh()
    torch.manual_seed(9)
    results = meta_update(together, base, task, train, features, config, seed=3)
    for index, alone in enumerate(fresh()):
        torch.manual_seed(9)
        (result,) = meta_update([alone], base, task, train, features, config, seed=3)
        # losses and the hypergradient's norm after inner fine-tunes whose weights rounding moved (conftest's
        # TRAINED_LOSS_REL); a run leaking into another moves them by far more
        for key in ("val_loss_before", "val_loss_after", "hypergrad_norm"):
            assert results[index][key] == pytest.approx(result[key], rel=TRAINED_LOSS_REL), (budgets[index], key)
        # every Adam step moves a weight by about meta_lr whatever the gradient's scale; rounding only tilts it
        for name, value in alone.state_dict().items():
            lr = config.base_lr_lr if name == "base_lrs" else config.meta_lr
            torch.testing.assert_close(together[index].state_dict()[name], value, rtol=0,
                                       atol=adam_rounding_tolerance(lr, config.outer_steps), msg=name)


def test_bf16_hypergradient_points_where_float32_does(setup):
    """A bf16 task computes the validation loss and its hypergradient under bf16 autocast (the meta-nets stay
    float32). At the same fine-tuned LoRAs it must differ from float32's (else autocast never ran) and point the same
    way: bf16 rounds every product to 2^-9 relative, and the ~20 chained rounded matmuls of the double backward leave
    an error of a few per cent of the gradient's norm (cosine 1 - e^2/2 >= 0.995 at e = 0.1); a hypergradient that
    lost a run's or a tensor's slice would be far off."""
    base, task, train, _ = setup
    inner = PersonalizeConfig(max_rank=8, epochs=1, batch_size=8, lora_lr=1e-2)
    config = FedL2PConfig(personalize=inner)
    torch.manual_seed(5)
    metanets = [LRMetaNet(metanet_spec(base, inner, "tiny", budget), base_lr=inner.lora_lr) for budget in (2, 8)]
    features = features_for(base, task, train, metanets[0].spec)
    rates = torch.stack([metanet.learning_rates(features) for metanet in metanets]).detach()
    model = MultiLoRAModel(base, task, [rate_run(m.spec, r, inner.seed) for m, r in zip(metanets, rates)])
    fit, validation = validation_split(train, 0.2, 0)
    training.train(model, task, fit, model.optimizer(), inner.epochs, inner.batch_size, seed=0)
    batch = task.collate(fit[:inner.batch_size])
    names = metanets[0].spec.module_names
    exact_loss, exact = validation_hypergradient(model, task, names, validation, batch, rates, config)
    rounded_loss, rounded = validation_hypergradient(model, replace(task, precision="bf16"), names, validation, batch,
                                                     rates, config)
    assert not torch.equal(exact, rounded)
    assert exact.abs().min(dim=1).values.gt(0).all()  # every tensor of every run has a hypergradient
    for run in range(len(metanets)):
        assert torch.nn.functional.cosine_similarity(exact[run], rounded[run], dim=0) > 0.99, run
        assert rounded_loss[run] == pytest.approx(exact_loss[run], rel=0.02)  # 2^-9 per product, ~10 chained


def test_config_from_dict_names_unknown_keys_and_nests_personalize():
    config = FedL2PConfig.from_dict({"outer_steps": 2, "personalize": {"lora_lr": 1e-3}})
    assert config.outer_steps == 2 and config.personalize.lora_lr == 1e-3
    assert (config.neumann_terms, config.neumann_step, config.meta_lr, config.base_lr_lr) == (3, 0.1, 1e-4, 1e-6)
    assert (config.max_grad_norm, config.validation_fraction) == (1.0, 0.2)
    with pytest.raises(FedP2EFTError, match=r"unknown key\(s\) \['neuman_terms'\]"):
        FedL2PConfig.from_dict({"neuman_terms": 3})
    with pytest.raises(FedP2EFTError, match="validation_fraction"):
        FedL2PConfig(validation_fraction=1.0)


# --- the file ---------------------------------------------------------------------------------------------------------


def test_save_load_roundtrip_and_header(tmp_path):
    torch.manual_seed(1)
    metanet = LRMetaNet(SPEC, base_lr=5e-4)
    with torch.no_grad():
        metanet.net[-1].bias.uniform_(0.5, 2.0)
        metanet.base_lrs.uniform_(1e-4, 1e-3)
    path = tmp_path / "deep" / "fedl2p-r4.safetensors"
    metanet.save(path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()["fedp2eft_fedl2p"]
    assert '"budget": 4' in header and '"base_model": "tiny"' in header
    loaded = LRMetaNet.load(path, expected=SPEC)
    assert loaded.spec == SPEC
    for key, value in metanet.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    features = torch.randn(14)
    assert torch.equal(loaded.learning_rates(features), metanet.learning_rates(features))


def test_load_refuses_other_models_budgets_and_files(tmp_path):
    path = tmp_path / "metanet.safetensors"
    LRMetaNet(SPEC).save(path)
    other_model = MetaNetSpec("other", SPEC.module_names[:5], 4, SPEC.feature_layers)
    with pytest.raises(FedP2EFTError, match="does not fit .*LoRA module lists differ"):
        LRMetaNet.load(path, expected=other_model)
    other_budget = MetaNetSpec("tiny", SPEC.module_names, 8, SPEC.feature_layers)
    with pytest.raises(FedP2EFTError, match=r"budget r differs \(4 vs 8\)"):
        LRMetaNet.load(path, expected=other_budget)
    generator_path = tmp_path / "psg.safetensors"
    PSGenerator(GeneratorSpec("tiny", SPEC.module_names, 8, SPEC.feature_layers)).save(generator_path)
    with pytest.raises(FedP2EFTError, match="not a fedp2eft FedL2P meta-net .*fedp2eft_generator.*fedp2eft benchmark"):
        LRMetaNet.load(generator_path)
    with pytest.raises(FedP2EFTError, match="not a fedp2eft PS generator .*fedp2eft_fedl2p"):
        PSGenerator.load(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file at all")
    with pytest.raises(FedP2EFTError, match="not a safetensors file"):
        LRMetaNet.load(junk)
    with pytest.raises(FedP2EFTError, match="no FedL2P meta-net at .*`fedp2eft benchmark` trains one .*`fedl2p`"):
        LRMetaNet.load(tmp_path / "missing.safetensors")


# --- the federated job and personalization ------------------------------------------------------------------------


def test_federated_task_updates_every_budget_and_exports_loadable_files(setup, tmp_path):
    base, task, train, _ = setup
    inner = PersonalizeConfig(max_rank=8, epochs=1, batch_size=8, lora_lr=1e-2)
    config = FedL2PConfig(personalize=inner, outer_steps=1, meta_lr=1e-2, base_lr_lr=1e-3)
    clients = [SimpleNamespace(train=train[:20]), SimpleNamespace(train=train[20:])]
    job = FedL2PTask(base, task, clients, config, "tiny", budgets=[4, 2])
    assert job.num_clients() == 2
    weights = job.initial_weights()
    assert weights.keys() == job.initial_weights().keys()
    assert all(torch.equal(v, job.initial_weights()[k]) for k, v in weights.items())  # deterministic
    assert {key.split(".")[0] for key in weights} == {"r2", "r4"}
    update = job.client_update(weights, 1, server_round=1)
    assert update.num_examples == 28
    assert update.weights.keys() == weights.keys()
    for budget in (2, 4):
        prefix = f"r{budget}."
        assert not torch.equal(update.weights[prefix + "net.4.bias"], weights[prefix + "net.4.bias"])
        assert update.metrics[f"val_loss_r{budget}"] > 0
    assert update.metrics["val_loss"] > 0 and update.metrics["mean_multiplier"] > 0
    directory = job.export(update.weights, tmp_path / "fedl2p")
    for budget in (2, 4):
        expected = metanet_spec(base, inner, "tiny", budget)
        loaded = LRMetaNet.load(metanet_file(directory, budget), expected=expected)
        assert torch.equal(loaded.base_lrs, update.weights[f"r{budget}.base_lrs"])
    with pytest.raises(FedP2EFTError, match=r"budget r differs \(2 vs 4\)"):
        LRMetaNet.load(metanet_file(directory, 2), expected=metanet_spec(base, inner, "tiny", 4))


def test_each_budgets_meta_net_can_start_at_its_own_rate(setup):
    """``budget_lr_scales`` (what the benchmark passes when uniform LoRA's rate was chosen per budget) sets where each
    budget's base rates start; a budget it does not list starts at the LoRA rate."""
    base, task, train, _ = setup
    inner = PersonalizeConfig(max_rank=8, lora_lr=1e-3)
    config = FedL2PConfig(personalize=inner, budget_lr_scales={"2": 3.0})
    weights = FedL2PTask(base, task, [SimpleNamespace(train=train)], config, "tiny", budgets=[2, 4]).initial_weights()
    assert torch.all(weights["r2.base_lrs"] == torch.tensor(3e-3, dtype=weights["r2.base_lrs"].dtype))
    assert torch.all(weights["r4.base_lrs"] == torch.tensor(1e-3, dtype=weights["r4.base_lrs"].dtype))


def test_personalize_fedl2p_reduces_training_loss_with_the_metanets_rates(setup):
    base, task, train, _ = setup
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    spec = metanet_spec(base, FAST, "tiny", 4)
    torch.manual_seed(0)
    metanet = LRMetaNet(spec, base_lr=FAST.lora_lr)
    context = ClientContext(base, task, train)
    before = task.evaluate(base, train)["loss"]
    result = personalize_fedl2p(context, 4, FAST, metanet)
    assert task.evaluate(result.model, train)["loss"] < 0.95 * before
    assert result.ranks == {name: 4 for name in spec.module_names}
    assert result.metrics["mean_lr"] == pytest.approx(FAST.lora_lr, rel=0.05)
    assert 0.95 <= result.metrics["multiplier_min"] <= result.metrics["multiplier_max"] <= 1.05  # fresh meta-net
    assert result.metrics["steps"] == FAST.epochs * 6
    assert result.model.peft_config["default"].lora_alpha == 8  # alpha = 2r
    for key, value in base.state_dict().items():  # the base model is never modified
        assert torch.equal(value, reference[key])

    # The rates really are per tensor: B (odd outputs) at rate 0 stays 0, so the model is the base model.
    with torch.no_grad():
        metanet.net[-1].weight.zero_()
        metanet.net[-1].bias[1::2] = 0.0
    frozen_b = personalize_fedl2p(context, 4, FAST, metanet)
    assert (frozen_b.metrics["multiplier_min"], frozen_b.metrics["multiplier_max"]) == (0.0, 1.0)
    batch = task.collate(train[:8])
    assert torch.equal(frozen_b.model(**batch).logits, base(**batch).logits)
    with pytest.raises(FedP2EFTError, match=r"budget r differs \(4 vs 2\)"):
        personalize_fedl2p(context, 2, FAST, metanet)


def test_meta_nets_per_grid_point_are_found_by_the_scale_and_a_missing_point_is_named():
    from fedp2eft.core.methods.fedl2p import MetaNetsPerPoint

    points = MetaNetsPerPoint({3.0: {2: "r2 at x3"}, 30.0: {2: "r2 at x30"}})
    assert points.at(30.0) == {2: "r2 at x30"} and points.at(3.0000000000001) == {2: "r2 at x3"}
    with pytest.raises(FedP2EFTError, match=r"trained at x3, x30 the configured meta learning rate, not at x10;"):
        points.at(10.0)
