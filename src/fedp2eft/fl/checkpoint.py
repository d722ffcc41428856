"""Crash-safe checkpoints: global weights per round (safetensors) plus ``state.json`` naming them.

Each round's weights get their own file and the state file is replaced last, so a run killed
at any instant leaves a state that points at a complete, matching weights file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl.job import Job
from fedp2eft.fl.weights import Weights

STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
BEST_FILE = "best.safetensors"


@dataclass
class RunState:
    """What a finished round leaves behind: enough to continue exactly where it stopped."""

    round: int
    checkpoint: str
    job: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _atomic_save_weights(path: Path, weights: Weights, server_round: int) -> None:
    """Weights as safetensors (the round in the metadata) via a temp file, so ``path`` is never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata={"round": str(server_round)})
    os.replace(tmp, path)


def checkpoint_name(server_round: int) -> str:
    return f"global-round{server_round:05d}.safetensors"


def save_round(output_dir: Path, weights: Weights, state: RunState) -> Path:
    """Write this round's weights, then the state that points at them; drop older weights files."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / state.checkpoint
    _atomic_save_weights(path, weights, state.round)
    _atomic_write_text(output_dir / STATE_FILE, json.dumps(asdict(state), indent=1, sort_keys=True))
    _atomic_write_text(
        output_dir / METRICS_FILE, "".join(json.dumps(row, sort_keys=True) + "\n" for row in state.history)
    )
    for old in output_dir.glob("global-round*.safetensors"):
        if old.name != state.checkpoint:
            old.unlink()
    return path


def is_new_best(history: list[dict[str, Any]], metric: str) -> bool:
    """Whether the last round's ``train/<metric>`` is lower than every earlier round's (the first value counts)."""
    key = f"train/{metric}"
    values = [row[key] for row in history[:-1] if key in row]
    return key in history[-1] and (not values or history[-1][key] < min(values))


def save_best(output_dir: Path, weights: Weights, server_round: int) -> None:
    """Keep ``weights`` (the global weights after ``server_round``) as the best so far, atomically."""
    _atomic_save_weights(output_dir / BEST_FILE, weights, server_round)


def load_best(output_dir: Path) -> tuple[Weights, int] | None:
    """The best weights kept so far and the round after which they were the global weights, if any."""
    from safetensors import safe_open

    path = output_dir / BEST_FILE
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as handle:
        server_round = int((handle.metadata() or {}).get("round", -1))
    return load_file(str(path)), server_round


def load_state(output_dir: Path) -> RunState | None:
    path = output_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        return RunState(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as error:
        raise FedP2EFTError(f"{path} is corrupt ({error}); delete the output directory or pick another") from error


def load_weights(output_dir: Path, state: RunState) -> Weights:
    path = output_dir / state.checkpoint
    if not path.exists():
        raise FedP2EFTError(f"{path} named by {STATE_FILE} is missing; the output directory was altered")
    return load_file(str(path))


def check_resumable(state: RunState, job: Job) -> None:
    """A resume must keep every field that shapes the trajectory; only ``rounds`` may grow."""
    previous = Job.from_dict(state.job).trajectory()
    current = job.trajectory()
    changed = sorted(k for k in current if previous.get(k) != current[k])
    if changed:
        raise FedP2EFTError(
            f"cannot resume {job.output_dir}: {changed} differ from the checkpointed run; "
            "use the original settings or a new output directory"
        )


def last_accepted_round(history: list[dict[str, Any]], client: int) -> int:
    """The last round whose update from ``client`` entered the aggregate (0: none): a stateful client continues
    from its state of that round, whatever it computed in rounds whose update was refused."""
    return max((row["round"] for row in history if client in row["clients"]), default=0)
