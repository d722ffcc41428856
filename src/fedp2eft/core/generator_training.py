"""Federated training of the PS generator (docs/method.md, "Federated training"), engine-free: one client's local
update.

Per round a client (1) computes its features x and Lambda0 = PSG(x); (2) stage 1: trains a fresh BT-LoRA
(same init every time) with lambda := Lambda0 under the BayesTune objective, giving Lambda_s; (3) stage 2:
fits PSG(x) to clamp(Lambda_s) with a few Adam steps of L1 regression (or, as an option, error-sized steps: docs/method.md,
"A stage 2 that ranks"); (4) returns only the PSG weights."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedp2eft.core.btlora import clamp_ste
from fedp2eft.core.budget import top_entries_mask
from fedp2eft.core.federation import ClientUpdate
from fedp2eft.core.generator import PSGenerator
from fedp2eft.core.personalization import PersonalizeConfig, features_for, generator_spec, new_btlora, train_btlora
from fedp2eft.core.tasks import Task
from fedp2eft.data.types import ClientData
from fedp2eft.errors import FedP2EFTError, config_from_mapping

GENERATOR_FILE = "generator.safetensors"


WARMUP_FRACTION = 20 / 150  # the paper's budget-sampling warm-up: 20 of 150 rounds
REGRESSIONS = ("l1-adam", "error-sized")  # stage 2: the paper's fit, or one whose step grows with each error


@dataclass
class GeneratorTrainingConfig:
    """Paper values by default (docs/method.md, "Federated training of the PS generator").

    ``budget_sampling`` is the optional any-budget variant (off in the paper's runs); its warm-up defaults to the
    paper's share of the rounds (20 of 150) of ``total_rounds``, the length of the federated run."""

    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    local_epochs: int = 2
    regression_steps: int = 10
    regression_lr: float = 1e-4
    regression: str = "l1-adam"  # "error-sized": docs/method.md, "A stage 2 that ranks" (not in the paper)
    regression_fraction: float = 0.5  # error-sized only: the share of the error each step removes
    budget_sampling: bool = False
    budget_warmup_rounds: int | None = None
    total_rounds: int | None = None
    standardize_features: bool = False  # not in the paper: docs/method.md, "Standardized features"
    seed: int = 0

    @classmethod
    def from_dict(cls, raw: dict) -> GeneratorTrainingConfig:
        raw = dict(raw)
        personalize = PersonalizeConfig.from_dict(raw.pop("personalize", {}))
        config = config_from_mapping(cls, {**raw, "personalize": personalize}, "training")
        if config.regression not in REGRESSIONS:
            raise FedP2EFTError(f"training.regression '{config.regression}' is unknown; use one of "
                                f"{', '.join(REGRESSIONS)}")
        if not 0.0 < config.regression_fraction <= 1.0:
            raise FedP2EFTError(f"training.regression_fraction {config.regression_fraction} must lie in (0, 1]: it "
                                "is the share of the generator's error one step removes")
        if config.budget_sampling and config.budget_warmup_rounds is None and config.total_rounds is None:
            raise FedP2EFTError("training.budget_sampling needs budget_warmup_rounds or total_rounds (the number "
                                "of federated rounds, from which the paper's 20/150 warm-up share is taken)")
        return config

    @property
    def warmup_rounds(self) -> int:
        if self.budget_warmup_rounds is not None:
            return self.budget_warmup_rounds
        return round(WARMUP_FRACTION * (self.total_rounds or 0))


class GeneratorTask:
    """The PS generator's federated job over the seen clients; implements ``FederatedTask``."""

    def __init__(self, base_model: nn.Module, task: Task, clients: list[ClientData], config: GeneratorTrainingConfig,
                 base_model_name: str) -> None:
        self.base_model = base_model
        self.task = task
        self.clients = clients
        self.config = config
        self.spec = generator_spec(base_model, config.personalize, base_model_name)
        self._features: dict[int, torch.Tensor] = {}

    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def needs_statistics(self) -> bool:
        """Standardized features need the federation's feature mean and std before round 1."""
        return self.config.standardize_features

    def new_generator(self) -> PSGenerator:
        return PSGenerator(self.spec, standardized=self.config.standardize_features)

    def initial_weights(self) -> dict[str, torch.Tensor]:
        if self.needs_statistics:
            raise FedP2EFTError("a generator on standardized features starts from the clients' feature statistics: "
                                "call initial_weights_from(sum of client_statistics) (the Flower engine does)")
        torch.manual_seed(self.config.seed)
        return self.new_generator().state_dict()

    def client_statistics(self, client_index: int) -> dict[str, torch.Tensor]:
        """This client's share of the federation's feature statistics: x and x*x (float64) and a count of 1, so the
        server needs only their sums (secure aggregation could hide the terms)."""
        x = self.features(client_index).double()
        return {"count": torch.ones(1, dtype=torch.float64), "sum": x, "sum_of_squares": x * x}

    def initial_weights_from(self, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The initial generator, standardized by the mean and std over clients of the summed statistics."""
        count = float(totals["count"].sum())
        mean = totals["sum"] / count
        std = (totals["sum_of_squares"] / count - mean * mean).clamp(min=0.0).sqrt()
        torch.manual_seed(self.config.seed)
        generator = self.new_generator()
        generator.standardize(mean.float(), std.float())
        return generator.state_dict()

    def features(self, client_index: int) -> torch.Tensor:
        """x depends only on the fixed base model and the client's data, so it is computed once per client."""
        if client_index not in self._features:
            client = self.clients[client_index]
            self._features[client_index] = features_for(self.base_model, self.task, client.train, self.spec)
        return self._features[client_index]

    def export(self, weights: dict[str, torch.Tensor], directory: Path) -> Path:
        """The trained generator as ``directory/generator.safetensors`` (with its JSON header)."""
        generator = self.new_generator()
        generator.load_state_dict(weights)
        generator.save(directory / GENERATOR_FILE)
        return directory / GENERATOR_FILE

    def _budget(self, client_index: int, server_round: int) -> int | None:
        config = self.config
        if not config.budget_sampling or server_round <= config.warmup_rounds:
            return None
        rank = config.personalize.max_rank
        choices = [rank >> shift for shift in range(rank.bit_length()) if rank >> shift >= 1]
        return random.Random(f"{config.seed}-{server_round}-{client_index}").choice(choices)

    def client_update(self, weights: dict[str, torch.Tensor], client_index: int, server_round: int) -> ClientUpdate:
        config = self.config
        torch.manual_seed(config.seed * 100_003 + server_round * 1_009 + client_index)
        generator = self.new_generator()
        generator.load_state_dict(weights)
        client = self.clients[client_index]
        x = self.features(client_index)
        with torch.no_grad():
            initial = generator(x)
        budget = self._budget(client_index, server_round)
        mask = (top_entries_mask(initial, len(self.spec.module_names), budget).float() if budget
                else torch.ones_like(initial))

        # Stage 1: BayesTune from Lambda0 on a fresh LoRA (lora_seed fixed => same init every round).
        model = new_btlora(self.base_model, config.personalize)
        model.set_scales(initial * mask)
        stage1 = train_btlora(model, self.task, client.train, config.personalize, config.local_epochs)
        target = clamp_ste(model.scales().detach().cpu()) * mask  # the generator lives on the CPU
        del model

        # Stage 2: fit the generator to the learned scales, fresh optimizer state.
        l1_before = float(((initial - target).abs() * mask).sum())
        if config.regression == "l1-adam":
            fit_l1_adam(generator, x, target, mask, config.regression_steps, config.regression_lr)
        else:
            fit_error_sized(generator, x, target, mask, config.regression_steps, config.regression_fraction)
        with torch.no_grad():
            l1_after = float(((generator(x) - target).abs() * mask).sum())
        metrics = {"stage1_loss": stage1.epoch_losses[-1], "l1_before": l1_before, "l1_after": l1_after,
                   "mean_lambda": float(target[mask > 0].mean()), "budget": float(budget or 0)}
        return ClientUpdate({k: v.detach().clone() for k, v in generator.state_dict().items()}, len(client.train),
                            metrics)


def fit_l1_adam(generator: PSGenerator, x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, steps: int,
                lr: float) -> None:
    """The paper's stage 2: Adam steps on the masked L1 error. Every output whose error has the same sign gets the
    same update, so outputs that start equal stay equal (docs/discussion.md, "The generator's ties")."""
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
    for _ in range(steps):
        loss = ((generator(x) - target).abs() * mask).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def fit_error_sized(generator: PSGenerator, x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, steps: int,
                    fraction: float) -> None:
    """Steepest descent on the masked squared error, each step as long as removes ``fraction`` of the error along
    its direction in the generator's linearization (docs/method.md, "A stage 2 that ranks"): an output's update
    grows with its error, so a larger target ends larger, and the step needs no learning rate that depends on the
    size of the features or the weights."""
    parameters = dict(generator.named_parameters())

    def outputs(values: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(generator, values, (x,))

    for _ in range(steps):
        error = (outputs(parameters) - target) * mask
        gradients = torch.autograd.grad(0.5 * error.pow(2).sum(), list(parameters.values()))
        direction = {name: gradient.detach() for name, gradient in zip(parameters, gradients)}
        frozen = {name: value.detach() for name, value in parameters.items()}
        _, moved = torch.func.jvp(outputs, (frozen,), (direction,))
        moved = moved * mask  # how the fitted outputs move along the gradient, to first order
        curvature = float(moved.pow(2).sum())
        if curvature == 0.0:  # no error left (or no output the fit can move)
            return
        # along -g the linearized error is e - t J g; t = <e, Jg> / |Jg|^2 minimizes it, and <e, Jg> = |g|^2
        length = fraction * sum(float(g.pow(2).sum()) for g in direction.values()) / curvature
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter -= length * direction[name]
