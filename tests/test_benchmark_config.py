import json

import pytest

from fedp2eft.benchmark.config import apply_overrides, load_profile, resolve, validate
from fedp2eft.errors import FedP2EFTError


@pytest.mark.parametrize("profile", ["default", "full", "quick", "paper", "paper-fedaya", "llm", "llm-quick", "pfl", "budget-peers"])
def test_profiles_load_and_share_one_schema(profile):
    config = load_profile(profile)
    assert set(config) == set(load_profile("default"))
    assert all(1 <= b <= config["personalize"]["max_rank"] for b in config["budgets"])


def test_the_main_job_is_the_full_protocol_cut_as_method_md_prices_it():
    """One seed, the two end budgets, four methods, the grid without its top scale and fewer base and generator
    rounds (docs/method.md, "The main job's arithmetic"); everything else is the full protocol's."""
    default, full = load_profile("default"), load_profile("full")
    assert default["seeds"] == [0] and full["seeds"] == [0, 1, 2]
    cut = ("seeds", "name", "budgets", "methods", "selection", "base", "psg")
    assert {key: value for key, value in full.items() if key not in cut} == \
        {key: value for key, value in default.items() if key not in cut}
    assert default["selection"] == {**full["selection"], "grid": full["selection"]["grid"][:-1]}
    for stage in ("base", "psg"):
        assert default[stage] == {**full[stage], "rounds": default[stage]["rounds"]}
        assert default[stage]["rounds"] < full[stage]["rounds"]
    # the budget diagnostic compares the smallest and largest budget, so the cut keeps both ends
    assert default["budgets"] == [min(full["budgets"]), max(full["budgets"])]
    assert set(default["methods"]) < set(full["methods"]) and "fedp2eft" in default["methods"]


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
    ("device=tpu", "not a known device"),
    ("selection.grid=[]", "selection.grid must list positive"),
    ("selection.grid=[1,-3]", "selection.grid must list positive"),
    ("selection.validation_fraction=1.5", "validation_fraction must be between 0 and 1"),
    ("psg.lr_scale=fast", "psg.lr_scale: fast cannot lend its selected learning-rate scale"),
    ("psg.lr_scale=fedp2eft", r"psg.lr_scale: fedp2eft cannot lend .* lora, adalora, btlora"),
    ("psg.lr_scale=-1", "psg.lr_scale must be a method name"),
    ("psg.training.bogus=1", "bogus"),
    ("fedl2p.training.outer_steps=0", "outer_steps must be >= 1"),
    ("psg.generator=x.safetensors", "unknown config key 'psg.generator'"),
    ("selection.pool=test", "selection.pool must be seen or unseen"),
    ("seeds=[0,0]", "each once"),
    ("generation_tokens=-1", "generation_tokens must be a whole number >= 0"),
    ("generation_tokens=2.5", "generation_tokens must be a whole number"),
    ("budgets=[1,2", r"override 'budgets=\[1,2': the value is not valid YAML"),
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


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible, so device=cuda is valid")
def test_cuda_without_a_gpu_fails_before_any_work():
    with pytest.raises(FedP2EFTError, match="device: cuda was requested but no CUDA GPU is visible"):
        resolve("quick", ["device=cuda"])


def test_the_saved_precision_is_resolved_and_a_bad_one_fails_before_any_work():
    assert resolve("quick", ["precision=fp32"])["precision"] == "fp32"
    assert resolve("quick", ["precision=bf16"])["precision"] == "bf16"
    assert resolve("quick", [])["precision"] in ("bf16", "fp32")  # auto, decided here for every stage and worker
    with pytest.raises(FedP2EFTError, match="precision: fp16 is not a known precision"):
        resolve("quick", ["precision=fp16"])


@pytest.mark.parametrize("written, number", [("1e-4", 1e-4), ("5E-5", 5e-5), ("-3e2", -300.0), ("+2e1", 20.0)])
def test_numbers_written_without_a_dot_are_numbers(written, number):
    config = apply_overrides(load_profile("quick"), [f"personalize.lora_lr={written}", f"selection.grid=[{written}]"])
    assert config["personalize"]["lora_lr"] == number and isinstance(config["personalize"]["lora_lr"], float)
    assert config["selection"]["grid"] == [number]


def test_a_config_file_reads_numbers_without_a_dot(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("profile: quick\npersonalize: {lora_lr: 2e-4}\n")
    assert load_profile(str(path))["personalize"]["lora_lr"] == 2e-4


@pytest.mark.parametrize("override, message", [
    ("personalize.lora_lr=fast", r"personalize.lora_lr must be a number \(the profile has 0.0001\), got the text "
                                 r"'fast'; write a plain number, e.g. 3, 0.001 or 1e-4"),
    ("personalize.lora_lr=", "personalize.lora_lr must be a number .*got nothing"),
    ("personalize.priors.gamma_rate=[1]", "personalize.priors.gamma_rate must be a number"),
    ("base.rounds=2.5", "base.rounds must be a whole number"),
    ("name=2024", """name must be text .*quote it to keep it text, e.g. 'name="2024"'"""),
    ("methods=lora", r"methods must be a list"),
    ("methods=[lora, 7]", r"methods\[1\] must be text"),
    ("personalize=3", "personalize must be a mapping"),
    ("dataset_options=3", "dataset_options must be a mapping"),
])
def test_a_value_of_the_wrong_type_names_its_key(override, message):
    with pytest.raises(FedP2EFTError, match=f"command line: {message}"):
        resolve("quick", [override])


def test_an_int_is_a_number_and_two_form_keys_take_both_forms():
    config = resolve("quick", ["personalize.lora_lr=1", "psg.lr_scale=btlora", "fedl2p.lr_scale=3"])
    assert config["personalize"]["lora_lr"] == 1 and config["psg"]["lr_scale"] == "btlora"
    assert config["fedl2p"]["lr_scale"] == 3


def test_a_config_file_value_of_the_wrong_type_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("profile: quick\nseeds: 0\n")
    with pytest.raises(FedP2EFTError, match="mine.yaml: seeds must be a list"):
        load_profile(str(path))


def fed_aya_folder(root, clients=10):
    """FedLLM-Bench's released Fed-Aya file (client id -> records), small: enough clients to hold 8 out."""
    folder = root / "Fed-Aya"
    folder.mkdir()
    data = {f"client{c}": [{"instruction": f"q{c}-{i}", "response": f"a{c}-{i}", "language": "en"} for i in range(3)]
            for c in range(clients)}
    (folder / "aya_38c_25k.json").write_text(json.dumps(data))
    return folder


def test_paper_fedaya_profile_is_one_command_given_the_data(tmp_path):
    folder = fed_aya_folder(tmp_path)
    config = resolve("paper-fedaya", [f"dataset_options.path={folder}"])
    assert config["dataset"] == "fed-aya" and config["dataset_options"] == {"path": str(folder)}
    assert config["model"] == "mtgv/MobileLLaMA-1.4B-Base" and config["max_length"] == 1024
    assert config["psg"]["rounds"] == 150 and config["psg"]["clients_per_round"] == 3
    assert config["base"]["clients_per_round"] == 3 and config["base"]["training"]["mode"] == "lora"
    personalize = config["personalize"]
    assert personalize["epochs"] == 2 and personalize["lora_lr"] == 1e-4 and personalize["max_rank"] == 32
    config = resolve("paper-fedaya", [f"dataset_options.path={folder}", "dataset_options.unseen_clients=[1,4]"])
    assert config["dataset_options"] == {"path": str(folder), "unseen_clients": [1, 4]}  # both keys stay


def test_paper_fedaya_without_its_data_fails_before_any_work(tmp_path):
    with pytest.raises(FedP2EFTError, match=r"fed-aya: no path given.*dataset_options.path=DIR"):
        resolve("paper-fedaya", [])
    with pytest.raises(FedP2EFTError, match=r"fed-aya: .*missing does not exist"):
        resolve("paper-fedaya", [f"dataset_options.path={tmp_path / 'missing'}"])
    with pytest.raises(FedP2EFTError, match=r"5 usable clients in .*unseen_clients=8"):  # the whole load runs first
        resolve("paper-fedaya", [f"dataset_options.path={fed_aya_folder(tmp_path, clients=5)}"])
    with pytest.raises(FedP2EFTError, match=r"fed-aya: .*unexpected keyword argument 'pathh'"):
        resolve("paper-fedaya", [f"dataset_options.pathh={tmp_path}"])


def test_a_bad_data_file_fails_before_any_work(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("text;label;language\nhello;greet;en\n")
    with pytest.raises(FedP2EFTError, match="mine.csv: columns are separated by ';'"):
        resolve("quick", [f"dataset={path}", "dataset_options={}"])


def _validation_records(correct: dict[tuple[str, int, float], int], count: int = 10) -> list[dict]:
    rows = [{"method": m, "budget": b, "scale": s, "correct": c, "count": count} for (m, b, s), c in correct.items()]
    return [{"client": "en-u0", "rows": rows}]


def test_selection_pools_the_budgets_unless_told_to_choose_per_budget():
    """A scale that wins one budget by a sentence loses to one that is better over all budgets; per budget, each
    budget gets its own winner; ties go to the smaller scale; a learned-rate method keeps 1, unless its stage's
    rate (FedL2P's meta learning rate) is selected on the grid."""
    from fedp2eft.benchmark.lr_selection import chosen_scales

    config = resolve("quick", ["methods=[lora,fedl2p]", "budgets=[2,8]", "fedl2p.select_on_grid=false"])
    assert config["selection"]["per_budget"] is False and config["selection"]["grid"] == [3.0, 30.0]
    records = _validation_records({("lora", 2, 3.0): 6, ("lora", 2, 30.0): 5, ("lora", 8, 3.0): 4,
                                   ("lora", 8, 30.0): 8})
    assert chosen_scales(config, records) == {"lora": {2: 30.0, 8: 30.0}, "fedl2p": {2: 1.0, 8: 1.0}}
    gridded = {**config, "fedl2p": {**config["fedl2p"], "select_on_grid": True}}
    meta = _validation_records({("fedl2p", 2, 3.0): 4, ("fedl2p", 2, 30.0): 5, ("fedl2p", 8, 3.0): 4,
                                ("fedl2p", 8, 30.0): 4})
    assert chosen_scales(gridded, records + meta)["fedl2p"] == {2: 30.0, 8: 30.0}
    assert chosen_scales({**gridded, "fedl2p": {**gridded["fedl2p"], "artifact": "given"}}, records + meta)[
        "fedl2p"] == {2: 1.0, 8: 1.0}  # meta-nets given: nothing to select
    per_budget = {**config, "selection": {**config["selection"], "per_budget": True}}
    assert chosen_scales(per_budget, records)["lora"] == {2: 3.0, 8: 30.0}
    tied = _validation_records({("lora", 2, 3.0): 5, ("lora", 2, 30.0): 6, ("lora", 8, 3.0): 7,
                                ("lora", 8, 30.0): 6})
    assert chosen_scales(config, tied)["lora"] == {2: 3.0, 8: 3.0}


def test_fedl2p_starts_each_budget_at_the_rate_chosen_for_uniform_lora():
    """Its stage trains at LoRA's most chosen scale; a budget chosen at another scale gets the ratio, so its meta-net
    starts where uniform LoRA's rate for that budget is. With one scale for all budgets nothing is added."""
    from fedp2eft.benchmark.lr_selection import stage_budget_lr_scales, stage_lr_scale
    from fedp2eft.core.methods import STAGES

    config = resolve("quick", ["methods=[lora,fedl2p]", "budgets=[2,4,8]", "selection.per_budget=true"])
    chosen = {"lora": {2: 100.0, 4: 30.0, 8: 30.0}}
    assert stage_lr_scale(config, STAGES["fedl2p"], chosen) == 30.0
    factors = stage_budget_lr_scales(config, STAGES["fedl2p"], chosen)["budget_lr_scales"]
    assert factors == {"2": pytest.approx(100 / 30), "4": 1.0, "8": 1.0}
    assert stage_budget_lr_scales(config, STAGES["fedl2p"], {"lora": dict.fromkeys([2, 4, 8], 30.0)}) == {}
    assert stage_budget_lr_scales(config, STAGES["psg"], chosen) == {}  # the generator has no such setting


def test_a_stage_rate_borrowed_from_a_method_that_is_not_a_row_is_still_selected():
    """`methods=[fedp2eft]` on a profile whose generator trains at btlora's selected scale is a fair request: btlora
    is selected for the generator's stage and is no row of the results."""
    from fedp2eft.benchmark.lr_selection import chosen_scales, selected_methods, stage_lr_scale
    from fedp2eft.core.methods import stage_named

    config = resolve("quick", ["methods=[fedp2eft]"])
    assert config["psg"]["lr_scale"] == "btlora" and selected_methods(config) == ["fedp2eft", "btlora"]
    records = _validation_records({("btlora", 2, 3.0): 4, ("btlora", 2, 30.0): 7, ("btlora", 8, 3.0): 5,
                                   ("btlora", 8, 30.0): 6, ("fedp2eft", 2, 3.0): 8, ("fedp2eft", 2, 30.0): 2,
                                   ("fedp2eft", 8, 3.0): 8, ("fedp2eft", 8, 30.0): 2})
    chosen = chosen_scales(config, records)
    assert chosen == {"fedp2eft": {2: 3.0, 8: 3.0}, "btlora": {2: 30.0, 8: 30.0}}
    assert stage_lr_scale(config, stage_named("psg"), chosen) == 30.0
    assert selected_methods(resolve("quick", ["methods=[fedp2eft,btlora]"])) == ["fedp2eft", "btlora"]


def test_an_override_of_one_key_of_a_free_form_section_keeps_the_profiles_others():
    """`dataset_options.alpha=5` changes label skew, not the languages and clients of the profile (a whole new set of
    dataset options came silently before); a new `dataset=` starts its options afresh."""
    profile = resolve("default", [])
    config = resolve("default", ["dataset_options.alpha=5.0", "psg.training.regression_steps=3"])
    assert config["dataset_options"] == {**profile["dataset_options"], "alpha": 5.0}
    assert config["psg"]["training"] == {**profile["psg"]["training"], "regression_steps": 3}
    other = resolve("default", ["dataset=intents-chat", "dataset_options.clients_per_language=2"])
    assert other["dataset_options"] == {"clients_per_language": 2}
