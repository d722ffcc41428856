"""The command line's surface: the version, the output flags on every command, closed sets checked by argparse,
help that shows defaults, client ids in `data describe`, and no colour codes when output is not a terminal."""

import argparse
import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from fedp2eft.cli import build_parser, main
from fedp2eft.core.methods import METHODS


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every command that runs something, e.g. (("data", "describe"), ...)."""
    groups = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not groups:
        yield path, parser
        return
    for name, child in groups[0].choices.items():
        yield from leaf_commands(child, (*path, name))


def required_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """A value ("1") for every positional and required option of a command."""
    words = []
    for action in parser._actions:
        if not action.option_strings:
            words.append("1")
        elif action.required:
            words += [action.option_strings[0], "1"]
    return words


def small_dataset(folder):
    path = folder / "mine.jsonl"
    path.write_text("".join(json.dumps({"text": f"{language} sentence {i}", "label": "abc"[i % 3],
                                        "language": language}) + "\n"
                            for language in ("en", "fr") for i in range(60)))
    return path


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedp2eft {version('fedp2eft')}"


def test_version_answers_without_importing_torch():
    """`fedp2eft --version` must not pay for the command tree (torch, PEFT: seconds)."""
    script = ("import sys\nfrom fedp2eft.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n"
              "    print(sorted({'torch', 'peft', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == [f"fedp2eft {version('fedp2eft')}", "[]"], done.stderr


def test_output_flags_are_accepted_before_and_after_every_command():
    parser = build_parser()
    commands = list(leaf_commands(parser))
    assert {path[0] for path, _ in commands} >= {"models", "data", "personalize", "train-base", "benchmark"}
    for path, command in commands:
        words = [*path, *required_arguments(command)]
        before = parser.parse_args(["-q", *words])
        assert before.quiet is True and before.verbose is False, path
        after = parser.parse_args([*words, "--verbose"])
        assert after.verbose is True and after.quiet is False, path


def test_quiet_and_verbose_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["-q", "data", "describe", "intents", "-v"])
    assert exit_.value.code == 2 and "exclude each other" in capsys.readouterr().err


def test_every_option_has_help_that_shows_its_default():
    for path, command in leaf_commands(build_parser()):
        for action in command._actions:
            assert action.help, f"{' '.join(path)}: {action.dest} has no help"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "%(default)s" in action.help, f"{' '.join(path)}: {action.dest} hides its default"


@pytest.mark.parametrize("option, message", [
    (["--method", "bogus"], "argument --method: invalid choice: 'bogus' (choose from " +
     ", ".join(f"'{name}'" for name in METHODS)),
    (["--device", "tpu"], "argument --device: 'tpu' is not a device; use auto, cpu, cuda or cuda:N"),
])
def test_a_bad_closed_set_value_fails_before_any_loading(capsys, option, message):
    with pytest.raises(SystemExit) as exit_:  # argparse stops before the command loads data or a model
        main(["personalize", "--model", "no-such-model", "--client", "en-u0", *option])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_data_describe_lists_client_ids_per_pool(tmp_path, capsys):
    assert main(["data", "describe", str(small_dataset(tmp_path)), "--clients-per-language", "2"]) == 0
    out = capsys.readouterr().out
    assert "client ids" in out
    for language in ("en", "fr"):
        assert f"{language}-s0 {language}-s1" in out and f"{language}-u0 {language}-u1" in out


def test_no_colour_codes_when_output_is_not_a_terminal(tmp_path):
    good, bad = small_dataset(tmp_path), tmp_path / "empty.csv"
    bad.write_text("")
    script = (f"from fedp2eft.cli import main; main(['data', 'describe', {str(good)!r}]); "
              f"main(['data', 'describe', {str(bad)!r}])")
    env = {key: value for key, value in os.environ.items() if key not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "client ids" in done.stdout and "fedp2eft: error:" in done.stderr
    assert "\x1b[" not in done.stdout and "\x1b[" not in done.stderr


def test_quiet_hides_progress_but_not_warnings(capsys):
    import logging

    from fedp2eft.logs import configure, console

    try:
        configure(quiet=True)
        console.rule("Stage 1/5")
        logging.getLogger("fedp2eft.benchmark.run_folder").warning("a results line was dropped")
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == "fedp2eft: warning: a results line was dropped\n"
    finally:
        configure()
    console.rule("Stage 1/5")
    assert "Stage 1/5" in capsys.readouterr().out


def test_flower_notices_follow_the_flags_even_when_flower_was_imported_first():
    """Building the parser imports Flower (the personalize command's help shows the default profile's values), so
    FLWR_LOG_LEVEL is read before the flags are known; configure must still hide Flower's notices, and show them
    under --verbose. A fresh interpreter, because Flower reads the variable once per process."""
    script = ("import sys; from fedp2eft.cli import build_parser; build_parser(); "
              "assert 'flwr.supercore.logger' in sys.modules; "
              "from fedp2eft.logs import configure; from flwr.common.logger import warn_deprecated_feature; "
              "configure(); warn_deprecated_feature('hidden entry point'); "
              "configure(verbose=True); warn_deprecated_feature('shown entry point')")
    stderr = _stderr_of_fresh_interpreter(script, without="FLWR_LOG_LEVEL")
    assert "hidden entry point" not in stderr and "shown entry point" in stderr


def _stderr_of_fresh_interpreter(script: str, without: str, **extra: str) -> str:
    """What ``python -c script`` writes to stderr, run with this environment less the variable ``without`` plus
    ``extra``; it must succeed."""
    env = {key: value for key, value in os.environ.items() if key != without} | extra
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_no_plain_tqdm_bar_reaches_the_terminal():
    """transformers' GGUF loader draws a plain tqdm bar on every load of the embedded Gemma, past transformers' own
    switch; a fedp2eft command turns such bars off for itself and the processes it starts (TQDM_DISABLE, read when
    tqdm is imported, which building the parser already does). A fresh interpreter: tqdm reads it once."""
    script = ("import sys, subprocess; from fedp2eft.cli import main\n"
              "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
              "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='drawn bar'):\n    pass\n"
              "subprocess.run([sys.executable, '-c', 'from tqdm import tqdm; list(tqdm(range(3), desc=\"child bar\"))'])")
    stderr = _stderr_of_fresh_interpreter(script, without="TQDM_DISABLE")
    assert "drawn bar" not in stderr and "child bar" not in stderr
    # a user who wants them sets TQDM_DISABLE= (tqdm reads "0" as true)
    assert "drawn bar" in _stderr_of_fresh_interpreter(script, without="TQDM_DISABLE", TQDM_DISABLE="")
