"""YAML for config files and ``key=value`` overrides, with numbers read as a user writes them.

YAML 1.1 (what PyYAML implements) reads ``1e-4`` and ``5E-5`` as *strings*: its floats need a dot. A learning rate
written that way would pass every check as text and fail later inside an optimizer, so this loader also reads
exponent numbers without a dot as floats, as YAML 1.2 does.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` plus floats of the form ``[-+]digits[e|E][-+]digits``."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse ``text`` like ``yaml.safe_load``, with ``1e-4`` read as the number 0.0001."""
    return yaml.load(text, Loader=ConfigLoader)
