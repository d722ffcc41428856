"""YAML for config files and ``key=value`` overrides, with numbers read as a user writes them.

YAML 1.1 (what PyYAML implements) reads ``1e-4`` and ``5E-5`` as *strings*: its floats need a dot. A learning rate
written that way would pass every check as text and fail later inside an optimizer, so this loader also reads
exponent numbers without a dot as floats, as YAML 1.2 does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from fedp2eft.errors import FedP2EFTError


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` plus floats of the form ``[-+]digits[e|E][-+]digits``."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse ``text`` like ``yaml.safe_load``, with ``1e-4`` read as the number 0.0001."""
    return yaml.load(text, Loader=ConfigLoader)


def load_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (``what`` it is, for messages: "config file", "task config"); an
    unreadable file, a YAML error (its problem and line, on one line) or another top-level shape is one
    ``FedP2EFTError``. An empty file is an empty mapping."""
    try:
        data = load_yaml(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise FedP2EFTError(f"cannot read {what} {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise FedP2EFTError(f"{what} {path} is not valid YAML: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FedP2EFTError(f"{what} {path} must be a YAML mapping (key: value lines), not a {type(data).__name__}")
    return data
