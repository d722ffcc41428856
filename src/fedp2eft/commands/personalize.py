"""``fedp2eft personalize``: one client, one method, one budget; evaluate and optionally export the adapter.

With ``--run`` every setting comes from a benchmark run folder, and the cell is computed by the benchmark's own
code (``benchmark.cells.personalize_cell``), so it reproduces that run's row; without it the settings are the
default profile's. An option given on the command line overrides either."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedp2eft.errors import FedP2EFTError

if TYPE_CHECKING:
    from fedp2eft.core.methods import Personalized
    from fedp2eft.experiment import Setup

PROFILE = "default"  # where the settings come from without --run


def device_setting(value: str) -> str:
    """argparse type of ``--device``: the spelling is checked at once; whether that device exists is checked by
    ``resolve_device`` when the command runs."""
    from fedp2eft.core.device import DEVICE_CHOICES, is_device_name

    if not is_device_name(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device; use {DEVICE_CHOICES}")
    return value


def default_profile() -> dict:
    from fedp2eft.benchmark.config import resolve

    return resolve(PROFILE, [])


def register(subparsers: argparse._SubParsersAction) -> None:
    from fedp2eft.core.device import PRECISIONS
    from fedp2eft.core.methods import METHODS

    profile = default_profile()
    parser = subparsers.add_parser(
        "personalize", help="personalize one client's model and evaluate it on its test set",
        description=f"Personalize one client with one of {', '.join(METHODS)} under a rank budget. With --run, as "
                    "that benchmark run did (its base model, data, dataset options, max_length, hyper-parameters, "
                    "selected learning rate, artifacts and seed): the result is the run's row for that client. "
                    f"Without --run, the '{PROFILE}' profile's settings (max_length {profile['max_length']}, its "
                    "personalize section: epochs, batch size, learning rates, priors). Options given here override "
                    "either.",
    )
    parser.add_argument("--run", type=Path,
                        help="a benchmark run folder, e.g. results/default (default: none, the profile's settings)")
    parser.add_argument("--model", help="base model: a checkpoint folder, hub id or embedded name (default: the "
                                        "run's base model; required without --run)")
    parser.add_argument("--data", help=f"dataset name or file/folder (default: the run's dataset and options; "
                                       f"without --run {profile['dataset']} with the profile's options "
                                       f"{profile['dataset_options']})")
    parser.add_argument("--client", required=True, help="client id (`fedp2eft data describe` lists them per pool)")
    parser.add_argument("--method", default="fedp2eft", choices=list(METHODS),
                        help="personalization method (default: %(default)s)")
    parser.add_argument("--budget", type=int, default=8, help="average LoRA rank per module r (default: %(default)s)")
    parser.add_argument("--seed", type=int,
                        help=f"personalization seed (default: the run's first seed; without --run "
                             f"{profile['seeds'][0]})")
    parser.add_argument("--artifact", "--generator", type=Path,
                        help="what the method's federated stage produced (the PS generator .safetensors for "
                             "fedp2eft, FedL2P's meta-net folder for fedl2p); needed by methods with a federated "
                             "stage only (default: the run's, for --seed)")
    parser.add_argument("--max-rank", type=int,
                        help=f"R, the maximum LoRA rank per module (default: the R the --artifact was made for; "
                             f"else the run's; without --run {profile['personalize']['max_rank']})")
    parser.add_argument("--lr-scale", type=float,
                        help="every learning rate times this (default: the scale the run selected for this method "
                             "and budget; without --run 1, the profile's learning rates as they are)")
    parser.add_argument("--export", type=Path,
                        help="write the personalized adapter here (standard PEFT); not written unless given")
    parser.add_argument("--device", type=device_setting,
                        help=f"auto (a CUDA GPU when present), cpu, cuda or cuda:N (default: the run's; without "
                             f"--run {profile['device']})")
    parser.add_argument("--precision", choices=list(PRECISIONS),
                        help=f"bf16 mixed precision or plain fp32; auto: bf16 where the hardware has it (default: the "
                             f"run's, so that its rows are reproduced; without --run {profile['precision']})")
    parser.set_defaults(func=run)


def command_config(args: argparse.Namespace) -> dict:
    """A benchmark config for this cell: the run's or the default profile's, with the command line's overrides."""
    from fedp2eft.benchmark.run_folder import run_config

    config = run_config(args.run) if args.run is not None else default_profile()
    if args.data is not None and args.data != config["dataset"]:
        config |= {"dataset": args.data, "dataset_options": {}}  # options belong to the dataset they were set for
    if args.device is not None:
        config["device"] = args.device
    if args.precision is not None:
        config["precision"] = args.precision
    return config


def base_model_of(args: argparse.Namespace, config: dict) -> str:
    from fedp2eft.benchmark.run_folder import finished_base

    if args.model is not None:
        return args.model
    if args.run is None:
        raise FedP2EFTError("give --run (a benchmark run folder, e.g. results/default) or --model (a base model)")
    base = finished_base(config, args.run)
    if base is None:
        raise FedP2EFTError(f"{args.run} has no base model yet; let its benchmark finish (run it again to resume)")
    return base


def artifact_of(args: argparse.Namespace, config: dict, seed: int) -> Path | None:
    """The artifact of the method's federated stage: given, or the run's for ``seed``; None for a method without
    a stage."""
    from fedp2eft.benchmark.run_folder import finished_artifact
    from fedp2eft.core.methods import method_spec

    stage = method_spec(args.method).stage
    if stage is None:
        return None
    if args.artifact is not None:
        return args.artifact
    found = finished_artifact(config, args.run, stage, seed) if args.run is not None else None
    if found is None:
        where = f"{args.run} has no {stage.name} artifact for seed {seed}" if args.run else "no --run"
        raise FedP2EFTError(f"method '{args.method}' needs --artifact ({where}): {stage.how_to_get}")
    return found


def max_rank_of(args: argparse.Namespace, config: dict, artifact: Path | None) -> int:
    """R: given, else the one the artifact was made for (a PS generator fixes it), else the run's or profile's."""
    from fedp2eft.core.methods import method_spec

    if args.max_rank is not None:
        return args.max_rank
    stage = method_spec(args.method).stage
    if artifact is not None and stage.max_rank is not None:
        return stage.max_rank(artifact)
    return int(config["personalize"]["max_rank"])


def lr_scale_of(args: argparse.Namespace) -> float:
    """The learning-rate scale: given, else the one the run selected for this method and budget, else 1."""
    from fedp2eft.benchmark.lr_selection import read_chosen_scales

    if args.lr_scale is not None:
        return args.lr_scale
    if args.run is None:
        return 1.0
    return read_chosen_scales(args.run / "selection.json", [args.method], [args.budget])[args.method][args.budget]


def locate_client(setup: Setup, client_id: str) -> tuple[str, int]:
    """(pool, index) of ``client_id``; an unknown id is an error listing a few of each pool's."""
    pools = {pool: [client.client_id for client in setup.data.pool(pool)] for pool in ("seen", "unseen")}
    for pool, ids in pools.items():
        if client_id in ids:
            return pool, ids.index(client_id)
    examples = "; ".join(f"{pool}: {', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''}"
                         for pool, ids in pools.items())
    raise FedP2EFTError(f"no client '{client_id}' in {setup.dataset} with options {setup.dataset_options or {}} "
                        f"({examples}; `fedp2eft data describe` lists them all)")


@dataclass
class Cell:
    """Everything that decides one client's result for one method and budget."""

    config: dict  # a benchmark config: the run's or the profile's, with the command line's overrides
    setup: Setup
    base_model: str
    method: str
    budget: int
    seed: int
    lr_scale: float
    artifact: Path | None
    pool: str
    index: int


def cell_of(args: argparse.Namespace) -> Cell:
    """The cell the command line asks for; every setting is checked before the model is loaded."""
    from fedp2eft.benchmark.run_folder import task_config
    from fedp2eft.core.budget import check_budget
    from fedp2eft.experiment import Setup

    config = command_config(args)
    base_model = base_model_of(args, config)
    seed = args.seed if args.seed is not None else config["seeds"][0]
    artifact = artifact_of(args, config, seed)
    config["personalize"]["max_rank"] = max_rank_of(args, config, artifact)
    check_budget(args.budget, config["personalize"]["max_rank"])
    lr_scale = lr_scale_of(args)
    setup = Setup.from_config(task_config(config, base_model, {}))
    return Cell(config, setup, base_model, args.method, args.budget, seed, lr_scale, artifact,
                *locate_client(setup, args.client))


def compute(cell: Cell) -> tuple[dict, Personalized]:
    """The cell's row (as in the run's ``personalize.jsonl``, with the client and its pool) and its model."""
    from fedp2eft.benchmark.cells import personalize_cell, seeded_personalize_config
    from fedp2eft.core.methods import ClientContext, method_spec, personalize_config
    from fedp2eft.core.pfl import apply_overlay

    setup, config = cell.setup, cell.config
    base = setup.load_base_model(config["device"])
    stage = method_spec(cell.method).stage
    settings = personalize_config(config["personalize"])
    artifacts = {} if stage is None else {stage.name: stage.load(cell.artifact, base, settings, cell.base_model)}
    client = setup.data.pool(cell.pool)[cell.index]
    with apply_overlay(base, setup.personal_overlay(base, cell.pool, cell.index)):  # a pFL base: the client's own
        context = ClientContext(base, setup.task, client.train, artifacts)
        row, result = personalize_cell(context, client.test, cell.method, cell.budget,
                                       seeded_personalize_config(config, cell.seed), cell.lr_scale)
    report = {"seed": cell.seed, "pool": cell.pool, "client": client.client_id, "language": client.language, **row,
              "lora_ranks_total": sum(result.ranks.values()), "modules_with_lora": len(result.ranks)}
    return report, result


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Compute with ``count`` threads (None: as many as torch chose), restoring the setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(args: argparse.Namespace) -> int:
    cell = cell_of(args)
    # with --run, one thread as each of the benchmark's workers (workers._init_worker): a parallel reduction may
    # round differently, and the result is to be the run's to the last bit
    with torch_threads(1 if args.run is not None else None):
        report, result = compute(cell)
    if args.export is not None:
        report["adapter"] = str(export(result, args.export, cell.setup, report["client"]))
    print(json.dumps(report, indent=1))
    return 0


def export(result: Personalized, directory: Path, setup: Setup, client_id: str) -> Path:
    """The adapter as a standard PEFT folder; on a pFL base it applies to this client's personal base, which
    ``personal_base.json`` beside it names."""
    result.export(directory)
    if setup.pfl is not None:
        (directory / "personal_base.json").write_text(json.dumps(
            {"base_model": str(setup.model_path), "algorithm": setup.pfl["algorithm"], "client": client_id}))
    return directory
