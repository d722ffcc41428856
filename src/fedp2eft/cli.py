"""``fedp2eft`` console script: one argparse tree; user errors print one clear line, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from fedp2eft.errors import FedP2EFTError

COMMAND_MODULES = ["models", "data"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedp2eft", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"fedp2eft.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedP2EFTError as error:
        print(f"fedp2eft: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
