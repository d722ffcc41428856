import pytest
import torch

from fedp2eft.core.budget import check_budget, select_top_ranks
from fedp2eft.core.generator import GeneratorSpec, PSGenerator
from fedp2eft.errors import FedP2EFTError

SPEC = GeneratorSpec("tiny", tuple(f"layer.{i}" for i in range(6)), 8, tuple(f"layer.{i}" for i in range(7)))


def test_generator_shape_and_first_output_near_1e_4():
    torch.manual_seed(0)
    generator = PSGenerator(SPEC)
    assert generator.net[0].in_features == 14 and generator.net[0].out_features == 28
    features = torch.randn(14) * 5
    output = generator(features)
    assert output.shape == (48,)
    assert output.min() >= 1e-4 and output.max() <= 2e-4
    other = generator(torch.randn(14) * 50)  # both layers start tiny: the first output ignores the features
    assert torch.allclose(output, other, atol=1e-7)


def test_generator_save_load_roundtrip(tmp_path):
    generator = PSGenerator(SPEC)
    with torch.no_grad():
        generator.net[-1].bias.uniform_(0.1, 2.0)
    generator.save(tmp_path / "psg.safetensors")
    loaded = PSGenerator.load(tmp_path / "psg.safetensors", expected=SPEC)
    features = torch.randn(14)
    assert loaded.spec == SPEC
    assert torch.equal(loaded(features), generator(features))


def test_standardized_generator_saves_its_statistics_and_raw_files_load_as_raw(tmp_path):
    torch.manual_seed(0)
    generator = PSGenerator(SPEC, standardized=True)
    mean, std = torch.randn(14), torch.rand(14) + 0.5
    generator.standardize(mean, std)
    with torch.no_grad():
        generator.net[0].weight.normal_()
        generator.net[-1].weight.normal_()
    raw = PSGenerator(SPEC)
    raw.load_state_dict({k: v for k, v in generator.state_dict().items() if not k.startswith("feature_")})
    features = torch.randn(14) * 3
    assert torch.allclose(generator(features), raw((features - mean) / std))
    generator.save(tmp_path / "standardized.safetensors")
    loaded = PSGenerator.load(tmp_path / "standardized.safetensors", expected=SPEC)
    assert loaded.standardized and torch.equal(loaded(features), generator(features))
    raw.save(tmp_path / "raw.safetensors")  # what every generator saved before the option looks like
    assert not PSGenerator.load(tmp_path / "raw.safetensors").standardized
    with pytest.raises(FedP2EFTError, match="without standardized features"):
        raw.standardize(mean, std)


def test_generator_for_other_model_is_refused(tmp_path):
    PSGenerator(SPEC).save(tmp_path / "psg.safetensors")
    other = GeneratorSpec("other", SPEC.module_names[:5], 8, SPEC.feature_layers)
    with pytest.raises(FedP2EFTError, match="does not fit"):
        PSGenerator.load(tmp_path / "psg.safetensors", expected=other)
    with pytest.raises(FedP2EFTError, match="max rank"):
        PSGenerator.load(tmp_path / "psg.safetensors", expected=GeneratorSpec("t", SPEC.module_names, 4,
                                                                                SPEC.feature_layers))


@pytest.mark.parametrize("budget", [1, 2, 4, 8])
def test_top_k_keeps_exactly_r_times_m(budget):
    torch.manual_seed(budget)
    names = list(SPEC.module_names)
    scales = torch.rand(len(names) * 8)
    selection = select_top_ranks(scales, names, 8, budget)
    assert selection.total == budget * len(names)
    threshold = torch.topk(scales, budget * len(names)).values.min()
    for row, name in enumerate(names):
        expected = (scales.view(len(names), 8)[row] >= threshold).nonzero().flatten()
        kept = selection.kept.get(name, torch.empty(0, dtype=torch.long))
        assert torch.equal(kept, expected)


def test_global_selection_can_give_a_module_no_rank():
    names = ["a", "b"]
    scales = torch.tensor([5.0, 4.0, 3.0, 2.0, 0.1, 0.2, 0.3, 0.4])
    selection = select_top_ranks(scales, names, 4, budget=2)
    assert selection.ranks == {"a": 4}
    assert torch.allclose(selection.values["a"], scales[:4])


def test_kept_entries_that_tie_with_a_left_out_one_are_counted():
    """docs/discussion.md, "The generator's ties": a cut through a group of equal entries keeps some of them by the
    sort's tie order; a cut between distinct values keeps none that way."""
    names = ["a", "b"]
    distinct = select_top_ranks(torch.tensor([5.0, 4.0, 3.0, 2.0, 0.1, 0.2, 0.3, 0.4]), names, 4, budget=2)
    assert distinct.tie_order == 0
    # the top 4 of these: 5, then three of the five entries equal to 3 (one of them 3 + 1e-6, within 1e-5 of 3)
    tied = select_top_ranks(torch.tensor([5.0, 3.0, 3.0, 1.0, 3.0, 3.0 + 1e-6, 3.0, 0.5]), names, 4, budget=2)
    assert tied.total == 4 and tied.tie_order == 3
    # a group entirely kept is the generator's choice, not the sort's
    whole = select_top_ranks(torch.tensor([5.0, 3.0, 3.0, 1.0, 3.0, 0.2, 0.3, 0.5]), names, 4, budget=2)
    assert whole.tie_order == 0


@pytest.mark.parametrize("budget", [0, -1, 9, 2.5])
def test_bad_budgets_are_refused(budget):
    with pytest.raises(FedP2EFTError, match="1 <= r <= R=8"):
        check_budget(budget, 8)
