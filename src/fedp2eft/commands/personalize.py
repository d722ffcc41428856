"""``fedp2eft personalize``: one client, one method, one budget; evaluate and optionally export the adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from fedp2eft.errors import FedP2EFTError

if TYPE_CHECKING:
    from torch import nn

    from fedp2eft.data.types import ClientData
    from fedp2eft.experiment import Setup


def device_setting(value: str) -> str:
    """argparse type of ``--device``: the spelling is checked at once; whether that device exists is checked by
    ``resolve_device`` when the command runs."""
    from fedp2eft.core.device import DEVICE_CHOICES, is_device_name

    if not is_device_name(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device; use {DEVICE_CHOICES}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from fedp2eft.core.methods import METHODS

    names = ", ".join(METHODS)
    parser = subparsers.add_parser(
        "personalize", help="personalize one client's model and evaluate it on its test set",
        description=f"Personalize one client with one of {names} under a rank budget.",
    )
    parser.add_argument("--model", required=True, help="base model: a checkpoint folder, hub id or embedded name")
    parser.add_argument("--data", default="intents", help="dataset name or file/folder (default: %(default)s)")
    parser.add_argument("--client", required=True, help="client id (`fedp2eft data describe` lists them per pool)")
    parser.add_argument("--method", default="fedp2eft", choices=list(METHODS),
                        help="personalization method (default: %(default)s)")
    parser.add_argument("--budget", type=int, default=8, help="average LoRA rank per module r (default: %(default)s)")
    parser.add_argument("--artifact", "--generator", type=Path,
                        help="what the method's federated stage produced (the PS generator .safetensors for "
                             "fedp2eft); needed by methods with a federated stage only")
    parser.add_argument("--max-rank", type=int, default=32,
                        help="R, the generator's maximum rank (default: %(default)s)")
    parser.add_argument("--export", type=Path,
                        help="write the personalized adapter here (standard PEFT); not written unless given")
    parser.add_argument("--device", default="auto", type=device_setting,
                        help="auto (a CUDA GPU when present), cpu, cuda or cuda:N (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedp2eft.core.device import resolve_device
    from fedp2eft.core.pfl import apply_overlay
    from fedp2eft.experiment import Setup

    device = resolve_device(args.device)
    setup = Setup(args.model, args.data, {})
    located = {client.client_id: (pool, index) for pool in ("seen", "unseen")
               for index, client in enumerate(setup.data.pool(pool))}
    if args.client not in located:
        raise FedP2EFTError(f"no client '{args.client}' in {args.data}; e.g. {', '.join(list(located)[:4])}")
    pool, index = located[args.client]
    base = setup.load_base_model(device)
    with apply_overlay(base, setup.personal_overlay(base, pool, index)):  # a pFL base: the client's own one
        report = personalize_and_report(args, setup, base, setup.data.pool(pool)[index])
    print(json.dumps(report, indent=1))
    return 0


def personalize_and_report(args: argparse.Namespace, setup: Setup, base: nn.Module, client: ClientData) -> dict:
    from fedp2eft.core.methods import PersonalizeConfig, method_spec, personalize

    stage = method_spec(args.method).stage
    config = PersonalizeConfig(max_rank=args.max_rank)
    artifact = None
    if stage is not None:
        if args.artifact is None:
            raise FedP2EFTError(f"method '{args.method}' needs --artifact: {stage.how_to_get}")
        artifact = stage.load(args.artifact, base, config, args.model)
    result = personalize(args.method, base, setup.task, client.train, args.budget, config, artifact)
    report = {"client": client.client_id, "language": client.language, "method": args.method,
              "budget": args.budget, "train": result.metrics, "test": setup.task.evaluate(result.model, client.test),
              "lora_ranks_total": sum(result.ranks.values()), "modules_with_lora": len(result.ranks)}
    if args.export is not None:
        result.export(args.export)
        report["adapter"] = str(args.export)
        if setup.pfl is not None:  # the adapter applies to this client's personal base, not the checkpoint alone
            (args.export / "personal_base.json").write_text(json.dumps(
                {"base_model": str(setup.model_path), "algorithm": setup.pfl["algorithm"], "client": client.client_id}))
    return report
