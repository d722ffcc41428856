import copy

import pytest
import torch
from peft import PeftModel
from torch import nn

from fedp2eft.core.btlora import BTLoRAModel, PriorConfig, clamp_ste, default_target_modules, resolve_target_modules
from fedp2eft.core.budget import select_top_ranks
from fedp2eft.errors import FedP2EFTError


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 4)) for _ in range(2)])

    def forward(self, x, labels=None):
        for block in self.blocks:
            x = block(x)
        return x


def toy_btlora(rank=4, init=0.5) -> BTLoRAModel:
    torch.manual_seed(0)
    model = Toy()
    targets = default_target_modules(model)
    return BTLoRAModel(model, {name: rank for name in targets}, scaling=2.0, init_scales=init)


def test_default_targets_are_block_linears(setup):
    model = setup[0]
    targets = default_target_modules(model)
    per_block = 6 if hasattr(model, "encoder") else 7
    assert len(targets) == 2 * per_block
    assert all(isinstance(dict(model.named_modules())[t], nn.Linear) for t in targets)
    assert not any(t.endswith(("head", "lm_head")) for t in targets)


def test_clamp_is_straight_through():
    values = torch.tensor([1e-6, 0.5, 5000.0], requires_grad=True)
    clamped = clamp_ste(values)
    assert torch.allclose(clamped, torch.tensor([1e-4, 0.5, 1000.0]))
    clamped.sum().backward()
    assert torch.equal(values.grad, torch.ones(3))


def test_gradients_reach_lambda_and_lora():
    model = toy_btlora()
    with torch.no_grad():
        for name in model.module_names:
            model.lora_b(name).normal_()  # B starts at zero; give lambda something to act on
    x = torch.randn(5, 4)
    (model(x).pow(2).sum() + model.prior_loss(10)).backward()
    for parameter in model.scale_parameters() + model.lora_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_gate_matches_formula():
    model = toy_btlora(init=0.3)
    name = model.module_names[0]
    layer = model.lora_layers[name]
    with torch.no_grad():
        model.lora_b(name).normal_()
    x = torch.randn(5, 4)
    a, b = layer.lora_A["default"].weight, model.lora_b(name)
    expected = layer.base_layer(x) + 2.0 * (x @ a.T * 0.3) @ b.T
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_priors_equal_hand_computed_values():
    model = toy_btlora(rank=2, init=0.5)
    n = 20
    with torch.no_grad():
        for name in model.module_names:
            model.lora_b(name).fill_(0.25)
        model.gate(model.module_names[0]).scale.copy_(torch.tensor([0.1, 2.0]))
    priors = PriorConfig(significance_weight=100.0, sparsity_weight=0.01, gamma_rate=100.0)
    expected_sig, expected_sp = 0.0, 0.0
    for name in model.module_names:
        out_features = model.lora_b(name).shape[0]
        lambdas = [0.1, 2.0] if name == model.module_names[0] else [0.5, 0.5]
        for lam in lambdas:
            expected_sig += out_features * 0.25 / lam
            expected_sp += torch.log(torch.tensor(lam)).item() + 100.0 * lam
    expected = (priors.significance_weight * expected_sig + priors.sparsity_weight * expected_sp) / n
    assert model.prior_loss(n).item() == pytest.approx(expected, rel=1e-5)


def test_rank_with_lambda_zero_changes_no_output():
    model = toy_btlora()
    with torch.no_grad():
        for name in model.module_names:
            model.lora_b(name).normal_()
    scales = model.scales().detach().clone()
    scales[1] = 0.0  # module 0, rank 1 switched off
    model.set_scales(scales)
    x = torch.randn(5, 4)
    before = model(x)
    name = model.module_names[0]
    with torch.no_grad():
        model.lora_b(name)[:, 1] += 10.0
        model.lora_layers[name].lora_A["default"].weight[1] += 10.0
    assert torch.allclose(model(x), before)
    with torch.no_grad():
        model.lora_b(name)[:, 0] += 10.0  # a live rank does change the output
    assert not torch.allclose(model(x), before)


def test_masks_switch_ranks_off_and_are_excluded_from_priors():
    model = toy_btlora(rank=2)
    full = model.prior_loss(10).item()
    model.set_masks({name: torch.tensor([1.0, 0.0]) for name in model.module_names})
    assert model.prior_loss(10).item() == pytest.approx(full / 2, rel=1e-5)
    assert (model.scales().view(-1, 2)[:, 1] == 0).all()


def test_target_patterns_that_match_nothing_are_refused():
    with pytest.raises(FedP2EFTError, match="match no linear layer"):
        resolve_target_modules(Toy(), ["q_proj"])
    assert resolve_target_modules(Toy(), [r"blocks\.0\.0"]) == ["blocks.0.0"]


def test_exported_adapter_equals_gated_model(tmp_path):
    torch.manual_seed(0)
    base = Toy()
    targets = default_target_modules(base)
    scales = torch.rand(len(targets) * 4) + 0.1
    selection = select_top_ranks(scales, targets, 4, budget=2)
    model = BTLoRAModel(copy.deepcopy(base), selection.ranks, 2.0, init_scales=selection.values,
                        trainable_scales=False)
    with torch.no_grad():
        for name in model.module_names:
            model.lora_b(name).normal_()
    x = torch.randn(7, 4)
    gated = model(x).detach()
    model.fold_scales().save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert torch.allclose(loaded(x), gated, atol=1e-5)
    modules = dict(base.named_modules())
    expected = sum(k * (modules[n].in_features + modules[n].out_features) for n, k in selection.ranks.items())
    lora_params = sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n)
    assert lora_params == expected
