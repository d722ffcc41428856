"""Benchmark configuration: a YAML profile, ``key.sub=value`` overrides, and validation before any work."""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fedp2eft.config_yaml import load_yaml, load_yaml_mapping
from fedp2eft.core.methods import METHODS, OWN_SETTINGS, STAGES, Stage, stages
from fedp2eft.errors import FedP2EFTError

PROFILES = ("default", "full", "quick", "paper", "paper-fedaya", "llm", "llm-quick", "pfl", "budget-peers",
            "value-projections", "weak-base")


def load_profile(name_or_path: str) -> dict[str, Any]:
    """A shipped profile by name, or a YAML file; either may name a shipped profile under ``profile:`` and then
    holds only what differs from it."""
    if name_or_path in PROFILES:
        raw = load_yaml(resources.files("fedp2eft.benchmark.profiles").joinpath(f"{name_or_path}.yaml").read_text())
        if "profile" not in raw:
            return with_stage_sections(raw)
        return merge(load_profile(raw.pop("profile")), raw, f"profile {name_or_path}")
    path = Path(name_or_path)
    if not path.is_file():
        raise FedP2EFTError(f"no config file or profile named '{name_or_path}'; profiles: {', '.join(PROFILES)}")
    raw = load_yaml_mapping(path, "config file")
    base = load_profile(raw.pop("profile", "default"))
    return merge(base, raw, str(path))


def stage_section(stage: Stage) -> dict:
    """A method stage's config section: its declared defaults, plus a file to reuse instead of training
    (``artifact``) and the learning-rate scale of its local training (``lr_scale``: a number or a method name); for a
    stage with a ``grid_field``, whether that rate is selected on the grid (``select_on_grid``, off by default: every
    grid point is a whole federated run)."""
    selectable = {"select_on_grid": False} if stage.grid_field else {}
    return {"artifact": None, "lr_scale": 1.0, **selectable, **stage.defaults}


# Top-level keys a profile or a saved config may leave out, with the value they take then (for a saved config, the
# value they had before they existed): instruction tasks' greedy tokens per test example, and the precision (runs
# before it existed computed in float32 on the CPU).
OPTIONAL_KEYS = {"generation_tokens": 0, "precision": "fp32"}


def own_settings_defaults() -> dict:
    """The ``personalize:`` keys that methods declare as their own settings (``MethodSpec.settings``), at their
    defaults: a method's setting is defined once, in its folder."""
    return {key: value for kind in OWN_SETTINGS.values() for key, value in asdict(kind()).items()}


def section_defaults() -> dict[str, dict]:
    """Keys of sections a profile may leave out: the base model's algorithm (FedAvg, or a personalized-FL base)
    and each pFL algorithm's own settings (``core/pfl.py``)."""
    from fedp2eft.core.pfl import ALGORITHM_SETTINGS

    # user-level DP of a federated stage ({noise_multiplier, clipping_norm, delta}) and its secure aggregation
    # (SecAgg+ settings; {} takes the defaults)
    private = {"privacy": {"dp": None, "secagg": None}}
    return {"base": {"algorithm": "fedavg", **copy.deepcopy(ALGORITHM_SETTINGS), **copy.deepcopy(private)},
            # reuse: a selection.json whose choice to apply instead of selecting; per_budget: one scale per method
            # and budget (true, how runs were made before the key existed) or one per method over all budgets
            "selection": {"reuse": None, "per_budget": True},
            "report": {"reference_run": None},  # a finished run's folder to compare every cell against
            # fine-tuning at budget r runs at lora_lr x (2 / r) ** rank_lr_exponent; 0 is the paper's one rate for
            # every rank (docs/method.md, "Learning rate and rank")
            "personalize": {"rank_lr_exponent": 0.0, **own_settings_defaults()},
            **{stage: copy.deepcopy(private) for stage in STAGES}}


def with_optional_keys(config: dict) -> dict:
    """``config`` with every optional key present (a run saved before a key existed reads as its default)."""
    config = {**OPTIONAL_KEYS, **config}
    for section, defaults in section_defaults().items():
        given = config.get(section, {})
        config[section] = {**defaults, **given}
        for key, default in defaults.items():  # one level deeper: privacy.secagg joined privacy.dp later
            if isinstance(default, dict) and isinstance(given.get(key), dict):
                config[section][key] = {**default, **given[key]}
    return config


def stage_min_clients(clients_per_round: int) -> int:
    """The fewest successful clients a federated stage's round accepts: half of its sample."""
    return max(1, clients_per_round // 2)


def check_privacy(config: dict) -> None:
    """Every federated stage's ``privacy.dp`` and ``privacy.secagg`` are empty or valid settings, which the stage's
    sample can run with."""
    from fedp2eft.fl.privacy import DPConfig
    from fedp2eft.fl.secure_aggregation import SecAggConfig

    for section in ("base", *(stage.name for stage in stages(config["methods"]))):
        dp, secagg = config[section]["privacy"]["dp"], config[section]["privacy"]["secagg"]
        if secagg is not None:
            if not isinstance(secagg, dict):
                raise FedP2EFTError(f"{section}.privacy.secagg must be a mapping of SecAgg+ settings ({{}} for the "
                                    f"defaults, e.g. {{clipping_range: 1.0}}), got {secagg!r}")
            if dp is not None:
                raise FedP2EFTError(f"{section}: privacy.dp and privacy.secagg cannot be combined yet (DP here clips "
                                    "on the server, which needs the updates SecAgg+ hides); use one")
            clients = config[section]["clients_per_round"]
            try:
                SecAggConfig.from_dict(secagg).check_sample(clients, stage_min_clients(clients))
            except FedP2EFTError as error:
                raise FedP2EFTError(f"{section}.{error}") from error
        if dp is not None:
            if not isinstance(dp, dict):
                raise FedP2EFTError(f"{section}.privacy.dp must be a mapping such as {{noise_multiplier: 1.0, "
                                    f"clipping_norm: 0.1, delta: 1.0e-5}}, got {dp!r}")
            try:
                DPConfig.from_dict(dp)
            except FedP2EFTError as error:
                raise FedP2EFTError(f"{section}.{error}") from error


def with_stage_sections(profile: dict) -> dict:
    """Every registered method stage gets its section, the profile's values over the stage's defaults, so a
    method added to the registry is configurable without editing the profiles; optional keys get their defaults."""
    profile.update(with_optional_keys(profile))
    for stage in STAGES.values():
        profile[stage.name] = {**stage_section(stage), **profile.get(stage.name, {})}
    return profile


def merge(base: dict, update: dict, where: str, prefix: str = "", keep_free_form: bool = False) -> dict:
    """Deep-merge ``update`` into a copy of ``base``, refusing keys that ``base`` does not have and values of another
    type than ``base`` holds (see ``check_type``). A free-form section (``_free_form``) is replaced as a whole, as in
    a config file, unless ``keep_free_form``: then its keys are set one by one over ``base``'s, except
    ``dataset_options`` when the same update changes ``dataset`` (its keys belong to the other dataset)."""
    result = copy.deepcopy(base)
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in result:
            raise FedP2EFTError(f"{where}: unknown config key '{name}'; known here: {', '.join(sorted(result))}")
        if _free_form(name):
            if not isinstance(value, dict | None):
                raise FedP2EFTError(f"{where}: {name} must be a mapping of settings ({name}.key=value), "
                                    f"got {_described(value)}")
            other_dataset = name == "dataset_options" and update.get("dataset", base.get("dataset")) != base.get(
                "dataset")
            keep = keep_free_form and not other_dataset and value is not None and result[key] is not None
            result[key] = {**result[key], **value} if keep else value
        elif isinstance(result[key], dict) and isinstance(value, dict):
            result[key] = merge(result[key], value, where, f"{name}.", keep_free_form)
        else:
            check_type(name, value, result[key], where)
            result[key] = value
    return result


def _free_form(name: str) -> bool:
    """Sections whose keys belong to another component (validated there)."""
    return name in {"dataset_options"} or name in {f"{stage}.training" for stage in STAGES}


def _two_forms(name: str) -> bool:
    """Keys that take two forms, checked by their own validation: a number or a method name (whose selected scale
    it uses; ``validate_stage``), one base algorithm or a list of them (``check_base_algorithm``), a file or
    nothing (``selection.reuse``)."""
    return name in {f"{stage}.lr_scale" for stage in STAGES} | {"base.algorithm", "selection.reuse",
                                                                "report.reference_run"}


KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text", list: "a list, e.g. [a, b]",
         dict: "a mapping of settings"}


def _kind(value: Any) -> type:
    return next((kind for kind in KINDS if isinstance(value, kind)), type(value))


def _fits(value: Any, default: Any) -> bool:
    """An int where the profile holds a float is fine; a boolean is never a number and a number never a boolean."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, _kind(default))


def _described(value: Any) -> str:
    if value is None:
        return "nothing (an empty value)"
    return f"the text {value!r}" if isinstance(value, str) else repr(value)


def _how_to_write(name: str, value: Any, default: Any) -> str:
    if isinstance(default, str) and not isinstance(value, str):
        return "; quote it to keep it text" + ("" if "[" in name else f", e.g. '{name}=\"{value}\"' in a shell")
    if isinstance(default, int | float) and not isinstance(default, bool) and isinstance(value, str):
        return "; write a plain number, e.g. 3, 0.001 or 1e-4"
    return ""


def check_type(name: str, value: Any, default: Any, where: str) -> None:
    """``value`` must have the type of the profile's ``default`` for the key ``name`` (list items: the type of the
    default's first item), so that a value of the wrong type fails here, before any work, and not inside a client.
    Keys whose default is null take any value; the component that uses them checks it."""
    if default is None or _two_forms(name):
        return
    if not _fits(value, default):
        example = "" if isinstance(default, list | dict) else f" (the profile has {default!r})"
        raise FedP2EFTError(f"{where}: {name} must be {KINDS[_kind(default)]}{example}, got {_described(value)}"
                            f"{_how_to_write(name, value, default)}")
    if isinstance(default, list) and default:
        for index, item in enumerate(value):
            check_type(f"{name}[{index}]", item, default[0], where)


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """``a.b=value`` pairs; values are parsed as YAML (numbers, ``1e-4`` included; lists, booleans). They are merged
    as one update into the profile: ``dataset_options.alpha=5`` changes that key and keeps the profile's other
    dataset options (its languages, clients, sizes), unless ``dataset=`` changes in the same command, which starts
    that section afresh (its keys belong to the other dataset)."""
    update: dict = {}
    for item in overrides:
        if "=" not in item:
            raise FedP2EFTError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        cursor = update
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(cursor.get(part), dict):
                cursor[part] = {}
            cursor = cursor[part]
        try:
            cursor[parts[-1]] = load_yaml(raw)
        except yaml.YAMLError as error:
            raise FedP2EFTError(f"override '{item}': the value is not valid YAML ({error.problem}); lists are "
                                f"written [a, b], text with spaces or colons in quotes") from error
    return merge(config, update, "command line", keep_free_form=True)


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def validate(config: dict) -> dict:
    """Fail before any work on unknown methods, bad budgets, bad pools."""
    unknown = [m for m in config["methods"] if m not in METHODS]  # before any work, and never silently dropped
    if unknown:
        raise FedP2EFTError(f"unknown method(s) {unknown}; choose from: {', '.join(METHODS)}")
    max_rank = config["personalize"]["max_rank"]
    bad = [b for b in config["budgets"] if not isinstance(b, int) or not 1 <= b <= max_rank]
    if bad:
        raise FedP2EFTError(f"budget(s) {bad} out of range: each must be an integer in 1..R={max_rank}")
    if not set(config["pools"]) <= {"seen", "unseen"} or not config["pools"]:
        raise FedP2EFTError(f"pools must be a non-empty subset of [seen, unseen], got {config['pools']}")
    check_base_algorithm(config)
    check_privacy(config)
    if not config["seeds"] or len(set(config["seeds"])) != len(config["seeds"]):
        raise FedP2EFTError(f"seeds must list at least one seed, each once; got {config['seeds']}")
    selection = config["selection"]
    if not selection["grid"] or not all(_positive_number(v) for v in selection["grid"]):
        raise FedP2EFTError(f"selection.grid must list positive learning-rate scales, got {selection['grid']}")
    if not 0 < selection["validation_fraction"] < 1:
        raise FedP2EFTError("selection.validation_fraction must be between 0 and 1 (the share of a selection client's "
                            f"training data held out for validation), got {selection['validation_fraction']}")
    if selection["reuse"] is not None and not Path(str(selection["reuse"])).is_file():
        raise FedP2EFTError(f"selection.reuse: {selection['reuse']} is not a file; give the selection.json of a "
                            "finished run (its learning-rate choice is applied instead of selecting)")
    reference = config["report"]["reference_run"]
    if reference is not None and not (Path(str(reference)) / "personalize.jsonl").is_file():
        raise FedP2EFTError(f"report.reference_run: {reference} holds no personalize.jsonl; name a finished run's "
                            "folder (e.g. results/default) to compare this run against")
    if selection["pool"] not in ("seen", "unseen"):
        raise FedP2EFTError(f"selection.pool must be seen or unseen (whose clients' training data serve learning-rate "
                            f"selection), got {selection['pool']!r}")
    if not isinstance(selection["clients_per_language"], int) or selection["clients_per_language"] < 1:
        raise FedP2EFTError("selection.clients_per_language must be a positive integer")
    tokens = config["generation_tokens"]
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise FedP2EFTError(f"generation_tokens must be a whole number >= 0 (greedy tokens generated per test example "
                            f"of an instruction dataset; 0 scores next-token accuracy only), got {tokens!r}")
    for stage in stages(config["methods"]):
        validate_stage(config, stage)
    from fedp2eft.core.device import resolve_device, resolve_precision

    resolve_device(str(config["device"]))  # an unknown device, or cuda without a GPU, fails here, before any work
    # resolved once, here: the saved config names what every stage and worker computes in, and a run resumed on a
    # machine where `auto` means something else is refused rather than mixed
    config["precision"] = resolve_precision(config["precision"], str(config["device"]))
    from fedp2eft.data.registry import check_dataset, dataset_names

    dataset = config["dataset"]
    if dataset not in dataset_names() and not Path(dataset).exists():
        raise FedP2EFTError(f"unknown dataset '{dataset}'; choose from {', '.join(dataset_names())} or a path")
    check_dataset(dataset, dict(config["dataset_options"] or {}))  # e.g. Fed-Aya without dataset_options.path
    check_base_checkpoint(config)
    return config


def check_base_checkpoint(config: dict) -> None:
    """A reused base checkpoint must hold a classification head for the dataset's labels: one trained on another
    label set (or a plain encoder) would personalize every client with a random head (docs/method.md, "The
    classification head"). Checked before any work, at the cost of reading the dataset."""
    from fedp2eft.core.modeling import head_mismatch, saved_labels
    from fedp2eft.experiment import Setup

    checkpoint = config["base"]["checkpoint"]
    if not checkpoint:
        return
    setup = Setup(str(checkpoint), config["dataset"], dict(config["dataset_options"] or {}))
    if setup.data.task != "classification":
        return
    saved = saved_labels(setup.model_path)
    if saved != setup.data.labels:
        raise FedP2EFTError(f"base.checkpoint: {head_mismatch(setup.model_path, saved, setup.data.labels)}")


def check_base_algorithm(config: dict) -> None:
    """A personalized-FL base exists for seen clients only (their personal bases hold their own state): such a run
    personalizes, and selects learning rates on, the seen pool, and says so."""
    from fedp2eft.core.base_training import BASE_ALGORITHMS

    chosen = config["base"]["algorithm"]
    algorithms = chosen if isinstance(chosen, list) else [chosen]
    unknown = [a for a in algorithms if a not in BASE_ALGORITHMS]
    if unknown or not algorithms or len(set(algorithms)) != len(algorithms):
        raise FedP2EFTError(f"base.algorithm {chosen!r}: give one of {', '.join(BASE_ALGORITHMS)}, or a list of "
                            "distinct ones to run the benchmark on each base")
    personal = [a for a in algorithms if a != "fedavg"]
    if not personal:
        return
    algorithm = ", ".join(personal)
    if "seen" not in config["pools"]:
        raise FedP2EFTError(f"base.algorithm={algorithm} builds personal bases for seen clients only, but pools is "
                            f"{config['pools']}; use pools=[seen]")
    if config["base"]["checkpoint"]:
        raise FedP2EFTError(f"base.algorithm={algorithm} trains its own base (the clients keep their state); leave "
                            "base.checkpoint empty")
    if isinstance(chosen, list) and chosen[0] != "fedavg":
        raise FedP2EFTError(f"base.algorithm {chosen}: a list of bases starts with fedavg, whose learning-rate choice "
                            "(on validation data of clients no base has seen) the personalized-FL bases reuse")
    warn = logging.getLogger("fedp2eft.benchmark").warning
    if config["pools"] != ["seen"]:
        warn(f"base.algorithm={algorithm}: personal bases exist for seen clients only, so this run personalizes the "
             "seen pool")
        config["pools"] = ["seen"]
    if not isinstance(chosen, list) and not config["selection"]["reuse"] and config["selection"]["pool"] != "seen":
        warn(f"base.algorithm={algorithm}: learning rates are selected on seen clients' training data (their base "
             "saw it; selection.reuse=<a FedAvg run's selection.json> reuses a choice made on unseen clients)")
        config["selection"]["pool"] = "seen"


def validate_stage(config: dict, stage: Stage) -> None:
    """The section of a stage the methods need: a valid learning-rate scale and training settings its own
    config class accepts (unknown keys are named there)."""
    section = config[stage.name]
    lr_scale = section["lr_scale"]
    if isinstance(lr_scale, str):
        spec = METHODS.get(lr_scale)
        if spec is None or spec.stage is not None or spec.lr_field is None:
            usable = ", ".join(name for name, other in METHODS.items() if other.stage is None and other.lr_field)
            raise FedP2EFTError(f"{stage.name}.lr_scale: {lr_scale} cannot lend its selected learning-rate scale (it "
                                f"must be a method whose rate is selected before the federated stages: {usable}); "
                                f"give one of them or a number")
    elif not _positive_number(lr_scale):
        raise FedP2EFTError(f"{stage.name}.lr_scale must be a method name (whose selected scale it takes) or a "
                            f"positive number, got {lr_scale!r}")
    if not isinstance(section["training"], dict):
        raise FedP2EFTError(f"{stage.name}.training must be a mapping of training settings")
    stage.config_class.from_dict(dict(section["training"]))


def resolve(profile: str, overrides: list[str]) -> dict:
    return validate(apply_overrides(load_profile(profile), overrides))
