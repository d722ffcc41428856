"""``fedp2eft`` console script: one argparse tree; user errors print one clear line, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version

from fedp2eft.errors import FedP2EFTError
from fedp2eft.interrupt import stop_on_interrupt
from fedp2eft.logs import configure

COMMAND_MODULES = ["models", "data", "personalize", "federated", "benchmark"]
DESCRIPTION = (
    "Personalize multilingual language models with LoRA in federated learning (FedP²EFT): run the benchmark, "
    "train base models and personalization-strategy generators with Flower, personalize one client's model, "
    "and inspect datasets and models."
)
EPILOG = "`fedp2eft COMMAND --help` shows a command's options. Documentation: README.md and docs/."


def package_version() -> str:
    try:
        return version("fedp2eft")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def add_output_flags(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="hide progress output (stage headers, progress bars, round lines); results, warnings "
                             "and errors still show")
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="show third-party warnings and log lines (Flower, Ray, transformers), hidden otherwise")


class CommandParser(argparse.ArgumentParser):
    """The parser of every command and subcommand: it takes the output flags after the command name too. There they
    default to SUPPRESS, so a flag given before the command name is not reset to False by the command's parser."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        add_output_flags(self, argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedp2eft", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    add_output_flags(parser, False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       parser_class=CommandParser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"fedp2eft.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:  # answered before the command tree is built, which imports torch and PEFT (seconds)
        print(f"fedp2eft {package_version()}")
        sys.exit(0)
    # No bars of plain tqdm: the progress a command shows is its own (rich), and transformers' GGUF loader draws one
    # per load of the embedded Gemma in every worker and Flower client, past its own switch. tqdm reads this when
    # imported, so it holds for this process (the parser imports it) and every process started from here;
    # an empty TQDM_DISABLE brings them back (tqdm reads any other value as true).
    os.environ.setdefault("TQDM_DISABLE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:
        parser.error("-q/--quiet and -v/--verbose exclude each other")
    args.command_line = "fedp2eft " + shlex.join(argv)
    configure(quiet=args.quiet, verbose=args.verbose)
    try:
        with stop_on_interrupt():
            return int(args.func(args) or 0)
    except FedP2EFTError as error:
        print(f"fedp2eft: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
