"""Keep third-party chatter (weight-loading bars, load reports) out of the user's terminal."""

from __future__ import annotations


def quiet_third_party() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
