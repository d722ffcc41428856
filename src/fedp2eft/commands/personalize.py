"""``fedp2eft personalize``: one client, one method, one budget; evaluate and optionally export the adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedp2eft.errors import FedP2EFTError


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
    from fedp2eft.core.methods import PersonalizeConfig, method_spec, personalize
    from fedp2eft.experiment import Setup

    stage = method_spec(args.method).stage
    device = resolve_device(args.device)
    setup = Setup(args.model, args.data, {})
    clients = {client.client_id: client for client in setup.data.seen + setup.data.unseen}
    if args.client not in clients:
        raise FedP2EFTError(f"no client '{args.client}' in {args.data}; e.g. {', '.join(list(clients)[:4])}")
    client = clients[args.client]
    base = setup.load_base_model(device)
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
    print(json.dumps(report, indent=1))
    return 0
