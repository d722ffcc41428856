"""Engine-free contract between a federated job (base model, PS generator) and whatever moves its tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import torch


@dataclass
class ClientUpdate:
    """What one client sends back after local work: new weights, its dataset size N, and scalar metrics; a task
    whose clients keep something of their own between rounds (``StatefulTask``) also returns the client's new
    ``state``, which stays on the client and is never sent."""

    weights: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    state: dict[str, torch.Tensor] | None = None


class FederatedTask(Protocol):
    """One federated training job. The FL engine only samples clients, ships ``weights`` and averages them.

    A task may also name ``best_metric``, a client metric measured on the weights a round starts from (lower is
    better): the engine then keeps the global weights whose sample-weighted mean of it is lowest, and the task's
    artifact is exported from those (early stopping without stopping)."""

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """The global weights before round 1 (deterministic for a given config)."""
        ...

    def num_clients(self) -> int:
        """How many clients (the seen pool) can be sampled; client indices run 0..num_clients-1."""
        ...

    def client_update(
        self, weights: dict[str, torch.Tensor], client_index: int, server_round: int
    ) -> ClientUpdate:
        """Run the local step of ``client_index`` from the given global weights."""
        ...


class ExportableTask(FederatedTask, Protocol):
    """A task whose final product is more than a weights file (a model checkpoint, a generator file)."""

    def export(self, weights: dict[str, torch.Tensor], directory: Path) -> Path:
        """Write the usable artifact for the final global ``weights`` under ``directory``; return its path."""
        ...


class StatisticsTask(FederatedTask, Protocol):
    """A task whose starting weights depend on sums over its clients (the PS generator on standardized features
    needs the federation's feature mean and std): when ``needs_statistics`` is true, the engine asks every client
    once, before round 1, for ``client_statistics`` and starts from ``initial_weights_from`` of their sums. Only
    sums are used, so the server could receive them through secure aggregation."""

    needs_statistics: bool

    def client_statistics(self, client_index: int) -> dict[str, torch.Tensor]:
        """This client's terms of the sums (tensors of fixed shapes)."""
        ...

    def initial_weights_from(self, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global weights before round 1, from the element-wise sums of every client's statistics."""
        ...


class StatefulTask(FederatedTask, Protocol):
    """A task whose clients keep tensors of their own across rounds (a local LoRA, local embeddings), as
    personalized-FL algorithms do (docs/method.md, "Personalized-FL bases"). When ``keeps_client_state`` is true
    the engine gives ``client_update`` the client's state from its last *accepted* round (None before its
    first), keeps the returned ``ClientUpdate.state`` on the client, and never moves it to the server."""

    keeps_client_state: bool

    def client_update(self, weights: dict[str, torch.Tensor], client_index: int, server_round: int,
                      state: dict[str, torch.Tensor] | None = None) -> ClientUpdate:
        """The local step from the global ``weights`` and this client's own ``state``."""
        ...


class Reply(NamedTuple):
    """One vetted client reply, as an ``AggregatingTask`` combines it."""

    client: int
    weights: dict[str, torch.Tensor]
    num_examples: int


class AggregatingTask(FederatedTask, Protocol):
    """A task whose server does more than average (HetLoRA's norm-weighted zero-padded factors, FlexLoRA's SVD of
    the averaged update): the engine sends client i ``client_weights(weights, i)`` instead of the global weights,
    vets its reply against that, and takes ``aggregate`` of the round's vetted replies as the new global weights.
    Differential privacy and secure aggregation assume an average of same-shaped updates, so such a task runs
    without them."""

    def client_weights(self, weights: dict[str, torch.Tensor], client_index: int) -> dict[str, torch.Tensor]:
        """What client ``client_index`` receives of the global ``weights`` (e.g. its own rank's share)."""
        ...

    def aggregate(self, weights: dict[str, torch.Tensor], replies: list[Reply],
                  server_round: int) -> dict[str, torch.Tensor]:
        """The new global weights from the current ones and the round's replies (sorted by client)."""
        ...


def aggregates_itself(task: FederatedTask) -> bool:
    return callable(getattr(task, "aggregate", None)) and callable(getattr(task, "client_weights", None))
