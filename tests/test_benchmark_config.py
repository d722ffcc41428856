import pytest

from fedp2eft.benchmark.config import apply_overrides, load_profile, resolve, validate
from fedp2eft.errors import FedP2EFTError


@pytest.mark.parametrize("profile", ["default", "quick", "paper"])
def test_profiles_load_and_share_one_schema(profile):
    config = load_profile(profile)
    assert set(config) == set(load_profile("default"))
    assert all(1 <= b <= config["personalize"]["max_rank"] for b in config["budgets"])


def test_overrides_parse_yaml_values():
    config = apply_overrides(load_profile("quick"), ["budgets=[1,4]", "psg.rounds=7", "name=x",
                                                     "personalize.priors.sparsity_weight=0.5"])
    assert config["budgets"] == [1, 4] and config["psg"]["rounds"] == 7 and config["name"] == "x"
    assert config["personalize"]["priors"]["sparsity_weight"] == 0.5


@pytest.mark.parametrize("override, message", [
    ("psg.roundz=3", "unknown config key 'psg.roundz'"),
    ("methods=[lora,lorax]", "unknown method"),
    ("budgets=[2,64]", "out of range"),
    ("pools=[seen,elsewhere]", "pools must be"),
    ("dataset=no-such-data", "unknown dataset 'no-such-data'"),
    ("budgets", "must look like key.sub=value"),
])
def test_bad_configs_fail_before_any_work(override, message):
    with pytest.raises(FedP2EFTError, match=message):
        resolve("quick", [override])


def test_config_file_extends_a_profile(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("profile: quick\nname: mine\nbudgets: [4]\n")
    config = validate(load_profile(str(path)))
    assert config["name"] == "mine" and config["budgets"] == [4] and config["psg"]["rounds"] == 2
    path.write_text("profile: quick\nbogus: 1\n")
    with pytest.raises(FedP2EFTError, match="unknown config key 'bogus'"):
        load_profile(str(path))
