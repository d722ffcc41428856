"""``train-base`` and ``train-<stage>`` (``train-psg``, ``train-fedl2p``, one per registered method stage): run the
federated jobs (docs/method.md, "Federated training") in Flower's simulation engine."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedp2eft.config_yaml import load_yaml_mapping
from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl.job import Job
from fedp2eft.interrupt import resumable


def commands() -> dict[str, tuple[str, str]]:
    """``train-base`` plus ``train-<stage>`` for the federated stage of every registered method."""
    from fedp2eft.core.methods import STAGES

    found = {"train-base": ("base", "FedAvg training of the base model on the seen clients")}
    for stage in STAGES.values():
        found[f"train-{stage.name}"] = (stage.name, f"federated training of {stage.title} on the seen clients")
    return found


def read_task_config(path: Path) -> dict[str, Any]:
    return load_yaml_mapping(path, "task config")


TASK_KEYS = {"model", "dataset", "dataset_options", "max_length", "device", "precision", "budgets", "generation_tokens",
             "training"}


def check_task_config(task: str, config: dict[str, Any], where: str) -> None:
    """The task YAML's keys and its ``training`` section, checked by the config class of ``task`` before any
    model is loaded (docs/federation.md, "Task configs")."""
    from fedp2eft.core.base_training import BaseTrainingConfig
    from fedp2eft.core.methods import STAGES
    from fedp2eft.errors import config_from_mapping

    unknown = sorted(set(config) - TASK_KEYS)
    missing = sorted({"model", "dataset"} - set(config))
    if unknown or missing:
        raise FedP2EFTError(f"{where}: unknown key(s) {unknown}, missing {missing}; a task config has "
                            f"{', '.join(sorted(TASK_KEYS))} (model and dataset required)")
    training = dict(config.get("training") or {})
    if task == "base":
        config_from_mapping(BaseTrainingConfig, training, f"{where}: training")
        return
    settings = STAGES[task].config_class.from_dict(training)
    max_rank = settings.personalize.max_rank
    bad = [b for b in config.get("budgets", []) if not isinstance(b, int) or not 1 <= b <= max_rank]
    if not config.get("budgets") or bad:
        raise FedP2EFTError(f"{where}: budgets must list rank budgets in 1..{max_rank} (training.personalize."
                            f"max_rank), got {config.get('budgets')}")


def run(args: argparse.Namespace) -> int:
    from fedp2eft.fl.simulation import run_federated  # pulls in Flower and Ray only when used
    from fedp2eft.fl.tasks import build_task, export_final

    from fedp2eft.core.methods import STAGES

    config = read_task_config(args.config)
    check_task_config(args.task, config, str(args.config))
    stage = STAGES.get(args.task)
    if stage is not None and stage.counts_rounds:
        config.setdefault("training", {}).setdefault("total_rounds", args.rounds)  # e.g. a warm-up share
    task = build_task(args.task, config)  # once for the server's side and the export
    with resumable(f"federated training of {args.task}", "the same command with --resume continues from the last "
                   "finished round"):
        run_federated(
            args.task, config, args.rounds, args.clients_per_round,
            output_dir=args.output, min_clients=args.min_clients, seed=args.seed,
            round_timeout_s=args.round_timeout, resume=args.resume, num_cpus_per_client=args.num_cpus, task=task,
        )
    print(export_final(args.task, config, args.output, task))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    for command, (task, help_text) in commands().items():
        parser = subparsers.add_parser(command, help=help_text, description=help_text)
        parser.add_argument("--config", type=Path, required=True, help="YAML file with the task config")
        parser.add_argument("--rounds", type=int, required=True, help="federated rounds to train")
        parser.add_argument("--clients-per-round", type=int, required=True, help="clients sampled per round")
        parser.add_argument("--min-clients", type=int, default=Job.min_clients,
                            help="fewest valid client updates a round needs (default: %(default)s)")
        parser.add_argument("--output", type=Path, required=True, help="directory for checkpoints and metrics")
        parser.add_argument("--resume", action="store_true", help="continue the run in --output (default: start anew)")
        parser.add_argument("--num-cpus", type=float, default=1.0,
                            help="CPU cores per simulated client (default: %(default)s)")
        parser.add_argument("--seed", type=int, default=Job.seed, help="client sampling seed (default: %(default)s)")
        parser.add_argument("--round-timeout", type=float, default=Job.round_timeout_s,
                            help="seconds to wait for a round's replies (default: %(default)s)")
        parser.set_defaults(func=run, task=task)
