"""The README's shell lines are commands the CLI accepts as written (parsed by the real argument parser; the
Python example runs in tests/test_benchmark_e2e.py next to a finished quick run)."""

import re
import shlex
from pathlib import Path

import pytest

from fedp2eft.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def fedp2eft_commands() -> list[list[str]]:
    """Every ``fedp2eft ...`` command in the README's bash blocks (continuation lines joined, comments cut, each
    part of an ``&&`` chain on its own)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in shlex.split(line, comments=True) and " ".join(shlex.split(line, comments=True)).split(" && "):
                words = shlex.split(part)
                if words and words[0].endswith("fedp2eft") and len(words) > 1:
                    commands.append(words[1:])
    inline = [shlex.split(text) for text in re.findall(r"`fedp2eft ([^`]+)`", README)]
    commands += [words for words in inline if words[0].islower() and not words[0].startswith("-")]
    return commands


def test_the_readme_has_commands_to_check():
    assert len(fedp2eft_commands()) >= 8


@pytest.mark.parametrize("argv", fedp2eft_commands(), ids=lambda argv: " ".join(argv)[:60])
def test_each_readme_command_parses(argv):
    build_parser().parse_args(argv)  # argparse exits (SystemExit) on anything it does not accept
