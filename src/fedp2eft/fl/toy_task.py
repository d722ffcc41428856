"""A tiny but real ``FederatedTask``: an MLP regressor trained with SGD on per-client synthetic data.

It exists to exercise the Flower layer (tests, benchmark, ``flwr run .`` smoke runs) without
loading a language model. Everything is deterministic from ``seed``, so resumed runs can be
compared bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from fedp2eft.core.federation import ClientUpdate
from fedp2eft.errors import FedP2EFTError


@dataclass(frozen=True)
class ToyConfig:
    """Knobs of the toy task; ``busy_ms`` adds fixed client compute to model a heavier model; ``local_offset``
    gives every client an output offset of its own that never leaves it (a stateful task: the smallest
    personalized-FL algorithm, used to test client state)."""

    num_clients: int = 4
    dim: int = 8
    hidden: int = 16
    local_steps: int = 5
    lr: float = 0.05
    min_examples: int = 8
    seed: int = 0
    busy_ms: float = 0.0
    local_offset: bool = False


class ToyTask:
    """Clients hold y = f_c(x) + noise with a client-specific target; the server learns one MLP."""

    best_metric = "loss_before"  # the incoming global model's loss: the engine keeps the best global weights

    def __init__(self, config: ToyConfig) -> None:
        if config.num_clients < 1 or config.dim < 1 or config.hidden < 1 or config.local_steps < 0:
            raise FedP2EFTError(f"toy task needs positive num_clients/dim/hidden, got {config}")
        self.config = config
        self.keeps_client_state = config.local_offset

    def _model(self) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(self.config.dim, self.config.hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(self.config.hidden, 1),
        )

    def initial_weights(self) -> dict[str, torch.Tensor]:
        torch.manual_seed(self.config.seed)
        return {k: v.detach().clone() for k, v in self._model().state_dict().items()}

    def num_clients(self) -> int:
        return self.config.num_clients

    def client_data(self, client_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthetic data of one client; sizes differ so that FedAvg weighting matters."""
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + client_index)
        n = self.config.min_examples + 4 * (client_index % 5)
        x = torch.randn(n, self.config.dim, generator=generator)
        target = torch.randn(self.config.dim, 1, generator=generator)
        y = torch.sin(x @ target) + 0.1 * torch.randn(n, 1, generator=generator)
        return x, y

    def client_update(
        self, weights: dict[str, torch.Tensor], client_index: int, server_round: int,
        state: dict[str, torch.Tensor] | None = None,
    ) -> ClientUpdate:
        if not 0 <= client_index < self.config.num_clients:
            raise FedP2EFTError(f"client_index {client_index} outside 0..{self.config.num_clients - 1}")
        model = self._model()
        model.load_state_dict(weights)
        offset = torch.nn.Parameter((state or {}).get("offset", torch.zeros(1)).clone(),
                                    requires_grad=self.config.local_offset)
        x, y = self.client_data(client_index)
        optimizer = torch.optim.SGD([*model.parameters(), offset], lr=self.config.lr)

        def loss_now() -> torch.Tensor:
            return torch.nn.functional.mse_loss(model(x) + offset, y)

        loss_before = loss_now().item()
        for _ in range(self.config.local_steps):
            optimizer.zero_grad()
            loss = loss_now()
            loss.backward()
            optimizer.step()
        if self.config.busy_ms > 0:
            time.sleep(self.config.busy_ms / 1000.0)
        with torch.no_grad():
            loss_after = loss_now().item()
        new_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        kept = {"offset": offset.detach().clone()} if self.config.local_offset else None
        return ClientUpdate(new_weights, len(x), {"loss_before": loss_before, "loss": loss_after}, kept)


def make_task(config: dict[str, Any]) -> ToyTask:
    """Factory used by ``build_task('toy', config)``."""
    try:
        return ToyTask(ToyConfig(**config))
    except TypeError as error:
        raise FedP2EFTError(f"bad toy task config {config}: {error}") from error
