"""The personalization-strategy generator (docs/method.md, "PS generator"): client features -> Lambda, one scale
per LoRA rank."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fedp2eft.core.artifacts import ArtifactKind, load_artifact, save_artifact
from fedp2eft.core.btlora import SCALE_MIN, clamp_ste
from fedp2eft.errors import FedP2EFTError

HEADER_KEY = "fedp2eft_generator"
ARTIFACT = ArtifactKind(HEADER_KEY, "PS generator", "train one with `fedp2eft train-psg`")
STD_FLOOR, STD_FLOOR_RELATIVE = 1e-6, 1e-3  # the smallest scale of a standardized feature: 1e-6 + 1e-3 |mean|


class FeatureLayout:
    """What every net reading client features is tied to (mixed into its spec dataclass, which has the fields
    ``module_names`` and ``feature_layers``): the LoRA module list it speaks for and the feature layers it reads."""

    module_names: tuple[str, ...]
    feature_layers: tuple[str, ...]

    @property
    def num_inputs(self) -> int:
        return 2 * len(self.feature_layers)

    def layout_mismatch(self, other: FeatureLayout) -> str | None:
        """A sentence saying how ``other``'s module list or feature layers differ, or None."""
        if self.module_names != other.module_names:
            missing = sorted(set(self.module_names) ^ set(other.module_names))[:3]
            return f"LoRA module lists differ ({len(self.module_names)} vs {len(other.module_names)}; e.g. {missing})"
        if self.feature_layers != other.feature_layers:
            return f"feature layers differ ({len(self.feature_layers)} vs {len(other.feature_layers)})"
        return None


@dataclass(frozen=True)
class GeneratorSpec(FeatureLayout):
    """What a generator is tied to: one base model, one module list, one max rank R, one feature layout."""

    base_model: str
    module_names: tuple[str, ...]
    rank: int
    feature_layers: tuple[str, ...]

    @property
    def num_outputs(self) -> int:
        return len(self.module_names) * self.rank

    def mismatch(self, other: GeneratorSpec) -> str | None:
        """A sentence saying how ``other`` differs from this spec, or None when they agree."""
        if self.rank != other.rank:
            return f"max rank R differs ({self.rank} vs {other.rank})"
        return self.layout_mismatch(other)


class PSGenerator(nn.Module):
    """Linear(D, 2D) -> PReLU -> Linear(2D, M*R) -> clamp to [1e-4, 1000] (straight-through).

    Both linear layers start with a tiny weight gain and bias 1e-4, so the first output is ~1e-4 everywhere
    whatever the client's features: the same start as plain BayesTune (docs/method.md, "PS generator").

    ``standardized`` (off in the paper) subtracts the federation's mean feature vector and divides by its standard
    deviation before the first layer (buffers ``feature_shift``/``feature_scale``, set by ``standardize`` from
    statistics summed over the clients). Client features differ by a few percent around a large common part, and
    on raw features the generator gives every client the same ranks (docs/method.md, "Standardized features")."""

    def __init__(self, spec: GeneratorSpec, init_gain: float = 1e-6, standardized: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.standardized = standardized
        width = 2 * spec.num_inputs
        self.net = nn.Sequential(
            nn.Linear(spec.num_inputs, width), nn.PReLU(), nn.Linear(width, spec.num_outputs)
        )
        for layer in (self.net[0], self.net[-1]):
            nn.init.xavier_uniform_(layer.weight, gain=init_gain)
            nn.init.constant_(layer.bias, SCALE_MIN)
        if standardized:
            self.register_buffer("feature_shift", torch.zeros(spec.num_inputs))
            self.register_buffer("feature_scale", torch.ones(spec.num_inputs))

    def standardize(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Use the federation's feature mean and standard deviation. A feature that hardly varies between clients
        (a layer norm's output std is 1 for everyone) is divided by at least 1e-3 of its size plus 1e-6, so that a
        new client's float noise on it is not blown up into a large input."""
        if not self.standardized:
            raise FedP2EFTError("this PS generator was built without standardized features (standardized=False)")
        self.feature_shift.copy_(mean)
        self.feature_scale.copy_(torch.maximum(std, STD_FLOOR_RELATIVE * mean.abs() + STD_FLOOR))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.standardized:
            features = (features - self.feature_shift) / self.feature_scale
        return clamp_ste(self.net(features))

    def save(self, path: str | Path) -> None:
        """Safetensors weights with the spec (and whether inputs are standardized) as a JSON header, written
        atomically (``core/artifacts.py``)."""
        save_artifact(path, self.state_dict(), ARTIFACT, {**asdict(self.spec), "standardized": self.standardized})

    @classmethod
    def load(cls, path: str | Path, expected: GeneratorSpec | None = None) -> PSGenerator:
        """Load a saved generator; refuse it when it was trained for a different model layout."""
        raw, state = load_artifact(path, ARTIFACT)
        spec = GeneratorSpec(
            base_model=raw["base_model"],
            module_names=tuple(raw["module_names"]),
            rank=int(raw["rank"]),
            feature_layers=tuple(raw["feature_layers"]),
        )
        if expected is not None and (reason := spec.mismatch(expected)):
            raise FedP2EFTError(
                f"the PS generator {path} was trained for base model '{spec.base_model}' and does not fit this "
                f"model ({reason}); train a generator for this model or load the matching base model"
            )
        generator = cls(spec, standardized=bool(raw.get("standardized", False)))  # files before the option: raw
        generator.load_state_dict(state)
        return generator
