"""``fedp2eft`` console script: one argparse tree; user errors print one clear line, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from fedp2eft.errors import FedP2EFTError
from fedp2eft.logs import quiet_third_party

COMMAND_MODULES = ["models", "data", "personalize", "federated", "benchmark"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedp2eft", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"fedp2eft.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = "fedp2eft " + shlex.join(argv)
    quiet_third_party()
    try:
        return int(args.func(args) or 0)
    except FedP2EFTError as error:
        print(f"fedp2eft: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
