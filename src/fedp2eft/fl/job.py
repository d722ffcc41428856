"""The federated job description: one JSON-able value that travels as Flower run_config ``job``.

Keeping every knob in one validated dataclass means simulation, ``flwr run`` and resume all
read the same fields the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedp2eft.errors import FedP2EFTError

if TYPE_CHECKING:
    from fedp2eft.fl.privacy import DPConfig
    from fedp2eft.fl.secure_aggregation import SecAggConfig

RUN_CONFIG_KEY = "job"

# Fields whose change alters the training trajectory; a resumed run must keep them.
TRAJECTORY_FIELDS = ("task", "task_config", "clients_per_round", "min_clients", "seed", "strategy", "dp", "secagg")


@dataclass(frozen=True)
class Job:
    """Everything the ServerApp needs to run (or resume) one federated training job."""

    task: str
    output_dir: str
    rounds: int
    clients_per_round: int
    task_config: dict[str, Any] = field(default_factory=dict)
    min_clients: int = 1
    seed: int = 0
    round_timeout_s: float = 600.0
    startup_timeout_s: float = 300.0
    resume: bool = False
    strategy: str = "fedavg"  # the Flower strategy that aggregates (``aggregation.py``)
    client_state_dir: str = ""  # where clients of a stateful task keep their state when their node names none
    dp: dict[str, float] | None = None  # user-level DP: {noise_multiplier, clipping_norm, delta} (``privacy.py``)
    secagg: dict[str, float] | None = None  # SecAgg+ settings (``secure_aggregation.py``); {} takes the defaults

    def __post_init__(self) -> None:
        if not self.task:
            raise FedP2EFTError("job.task is empty: give 'base', 'psg' or 'package.module:function'")
        if not self.output_dir:
            raise FedP2EFTError("job.output_dir is empty: give a directory for checkpoints and metrics")
        for name in ("rounds", "clients_per_round", "min_clients"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FedP2EFTError(f"job.{name} must be a positive integer, got {value!r}")
        if self.min_clients > self.clients_per_round:
            raise FedP2EFTError(
                f"job.min_clients ({self.min_clients}) exceeds clients_per_round "
                f"({self.clients_per_round}); lower min_clients or sample more clients"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise FedP2EFTError(f"job.seed must be a non-negative integer, got {self.seed!r}")
        for name in ("round_timeout_s", "startup_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise FedP2EFTError(f"job.{name} must be a positive number of seconds, got {value!r}")
        from fedp2eft.fl.aggregation import STRATEGIES
        from fedp2eft.fl.privacy import DPConfig

        if self.dp is not None:
            DPConfig.from_dict(dict(self.dp))
        if self.secagg is not None:
            if self.dp is not None:
                raise FedP2EFTError("privacy.dp and privacy.secagg cannot be combined yet: DP here clips and noises "
                                    "on the server, which needs each client's update that SecAgg+ hides; use one")
            self.secure.check_sample(self.clients_per_round, self.min_clients)
        if self.strategy not in STRATEGIES:
            raise FedP2EFTError(f"job.strategy {self.strategy!r} is unknown; use one of {sorted(STRATEGIES)}")
        if not isinstance(self.task_config, dict):
            raise FedP2EFTError("job.task_config must be a mapping (a YAML/JSON object)")
        try:
            json.dumps(self.task_config)
        except (TypeError, ValueError) as error:
            raise FedP2EFTError(f"job.task_config must be JSON-serialisable: {error}") from error

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    @property
    def privacy(self) -> DPConfig | None:
        from fedp2eft.fl.privacy import DPConfig

        return None if self.dp is None else DPConfig.from_dict(dict(self.dp))

    @property
    def secure(self) -> SecAggConfig | None:
        from fedp2eft.fl.secure_aggregation import SecAggConfig

        return None if self.secagg is None else SecAggConfig.from_dict(dict(self.secagg))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FedP2EFTError(f"unknown job keys {unknown}; allowed keys are {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as error:
            raise FedP2EFTError(f"incomplete job: {error}; required keys are task, output_dir, rounds, "
                                "clients_per_round") from error

    @classmethod
    def from_json(cls, text: str) -> Job:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise FedP2EFTError(f"run_config '{RUN_CONFIG_KEY}' is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise FedP2EFTError(f"run_config '{RUN_CONFIG_KEY}' must hold a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> Job:
        """Read the job from a Flower run_config (``flwr run . -c job='{...}'`` or a TOML override file)."""
        text = run_config.get(RUN_CONFIG_KEY)
        if not isinstance(text, str) or not text.strip():
            raise FedP2EFTError(
                f"run_config has no '{RUN_CONFIG_KEY}' JSON string; set it in [tool.flwr.app.config] "
                "or override it with `flwr run . --run-config overrides.toml`"
            )
        return cls.from_json(text)

    def trajectory(self) -> dict[str, Any]:
        """The fields that must match between a checkpoint and the job that resumes it (the task config's
        ``device`` may change: it decides where the clients compute, not what)."""
        data = asdict(self)
        data["task_config"] = {k: v for k, v in data["task_config"].items() if k != "device"}
        return {name: data[name] for name in TRAJECTORY_FIELDS}
