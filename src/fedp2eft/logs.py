"""What the user's terminal shows: fedp2eft's own progress, warnings and results, not third-party chatter.

``configure`` runs once per command, before Flower or Ray are imported: the environment variables it sets reach
every process they start (Ray actors, the benchmark's worker processes), which read them at start-up.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from rich.console import Console

# Progress of long commands (stage headers, progress bars, federated round lines); silent under --quiet. Results
# (reports, JSON, tables) are printed elsewhere and always show. Rich writes no colour codes off a terminal.
console = Console()
stderr_console = Console(stderr=True)


class _StderrHandler(logging.Handler):
    """fedp2eft's log records as ``fedp2eft: warning: ...`` lines, on the ``sys.stderr`` of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"fedp2eft: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


_handler = _StderrHandler()


def colour_allowed() -> bool:
    """Colour only when both output streams are terminals: a redirected stream gets plain text."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Apply ``--quiet`` (no progress output) and ``--verbose`` (third-party warnings and log lines shown)."""
    console.quiet = stderr_console.quiet = quiet
    logger = logging.getLogger("fedp2eft")  # warnings such as a dropped results line, as "fedp2eft: warning: ..."
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    if not colour_allowed():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray colours the "(ClientAppActor pid=...)" of worker lines
    if not sys.warnoptions:  # a user's own -W or PYTHONWARNINGS wins (Python docs, "warnings")
        shown = "default" if verbose else "ignore"  # deprecation notices of Flower, Ray, transformers, ...
        warnings.simplefilter(shown)
        os.environ["PYTHONWARNINGS"] = shown  # the same in every process started from here
    if "flwr.supercore.logger" in sys.modules:  # Flower read FLWR_LOG_LEVEL when imported (e.g. by --help texts)
        from flwr.common.logger import update_console_handler

        update_console_handler(level=logging.INFO if verbose else logging.ERROR)
    if verbose:
        return
    os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")  # Flower's deprecation notices are log records, not warnings
    quiet_third_party()


def plain_flower_logs() -> None:
    """Flower colours its log lines whether or not they go to a terminal; call after importing Flower."""
    if not colour_allowed():
        from flwr.common.logger import update_console_handler

        update_console_handler(colored=False)


def quiet_third_party() -> None:
    """Keep transformers' weight-loading bars and load reports out of the terminal."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
