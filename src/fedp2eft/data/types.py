"""The shape every dataset loader produces and every consumer reads: clients with train/test examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TaskKind = Literal["classification", "instruction"]


@dataclass
class ClientData:
    """One client's local data.

    Classification examples are dicts ``{"text": str, "label": int}`` (optionally ``"text_pair": str``),
    where ``label`` indexes ``FederatedDataset.labels``. Instruction examples are dicts
    ``{"instruction": str, "response": str}``.
    """

    client_id: str
    language: str
    train: list[dict]
    test: list[dict]


@dataclass
class FederatedDataset:
    """Clients split into a *seen* pool (used for base-model and generator training) and a disjoint
    *unseen* pool (only ever personalized and evaluated)."""

    name: str
    task: TaskKind
    labels: list[str]
    seen: list[ClientData]
    unseen: list[ClientData]
    info: dict = field(default_factory=dict)

    def pool(self, name: Literal["seen", "unseen"]) -> list[ClientData]:
        return self.seen if name == "seen" else self.unseen
