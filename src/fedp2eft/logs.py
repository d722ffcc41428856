"""Keep third-party chatter (weight-loading bars, load reports) out of the user's terminal."""

from __future__ import annotations


def quiet_third_party() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def notice(message: str) -> None:
    """A one-line note to the user about a setting the run adapted (on stderr, never lost in a progress bar)."""
    import sys

    print(f"fedp2eft: note: {message}", file=sys.stderr)
