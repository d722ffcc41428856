"""Where fedp2eft keeps what it builds once (converted models, built benchmarks)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$FEDP2EFT_CACHE`` or ``~/.cache/fedp2eft``."""
    return Path(os.environ.get("FEDP2EFT_CACHE") or Path.home() / ".cache" / "fedp2eft")
