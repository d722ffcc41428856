"""FedL2P's federated meta-training (docs/method.md, "Baselines"). Per round each client splits its training data
80/20 into inner-train and validation, fine-tunes a fresh LoRA on inner-train with the meta-net's learning rates,
and moves the meta-net along the hypergradient of the validation loss, computed with the implicit function theorem
and a Neumann-series inverse (FedL2P, following Lorraine et al., AISTATS 2020). One meta-net is trained per rank
budget r, as the paper does; ``FedL2PTask`` trains all of them in one federated run."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedp2eft.core.device import autocast_for, model_device, to_device
from fedp2eft.core.federation import ClientUpdate
from fedp2eft.core.multi_lora import LoRARun, MultiLoRAModel
from fedp2eft.core.personalization import ClientContext, PersonalizeConfig, features_for, runs_per_pass, \
    validation_split
from fedp2eft.core.tasks import Task, iterate_batches
from fedp2eft.core.training import train
from fedp2eft.errors import FedP2EFTError, config_from_mapping
from fedp2eft.core.methods.fedl2p.metanet import LRMetaNet, MetaNetSpec, metanet_file, metanet_spec

# --- the hypergradient -----------------------------------------------------------------------------------------------


def implicit_hypergradient(
    update: Callable[[list[torch.Tensor], list[torch.Tensor]], Sequence[torch.Tensor]],
    params: Sequence[torch.Tensor],
    hparams: Sequence[torch.Tensor],
    val_grads: Sequence[torch.Tensor],
    terms: int = 3,
    step: float = 0.1,
) -> list[torch.Tensor]:
    """dL_val/dh by the implicit function theorem, for parameters theta at a fixed point of the update map
    theta = Phi(theta, h) (Lorraine et al. 2020; FedL2P uses it for its meta-nets):

        dL_val/dh = v^T (I - J)^{-1} dPhi/dh,   v = dL_val/dtheta,   J = dPhi/dtheta,
        (I - J)^{-1} ~= step * sum_{k=0..terms} (I - step (I - J))^k      (a Neumann series),

    i.e. p_0 = v, p_{k+1} = p_k - step (p_k - p_k^T J), result = (step * sum_k p_k)^T dPhi/dh. Every product with J
    or dPhi/dh is one vector-Jacobian product through autograd; no Jacobian is ever formed. The series converges when
    every eigenvalue of step (I - J) lies in (0, 2); ``terms`` = 0 keeps only p_0 (step * v^T dPhi/dh).

    ``update(params, hparams)`` returns Phi, one tensor per parameter, and must be differentiable twice with respect
    to ``params`` (build gradients inside it with ``create_graph=True``). ``params`` must be the tensors the update
    actually reads and require grad (e.g. a model's own LoRA weights). ``hparams`` are taken by value: the result
    holds one gradient per hyperparameter, shaped like it, for the caller to chain further (``tensor.backward``).
    ``val_grads`` is v, one tensor per parameter. L_val is assumed to depend on h only through theta."""
    if terms < 0 or step <= 0:
        raise FedP2EFTError(f"the Neumann series needs terms >= 0 and step > 0 (got {terms}, {step})")
    leaves = [value.detach().clone().requires_grad_(True) for value in hparams]
    params = list(params)
    phi = list(update(params, leaves))
    term = [grad.detach() for grad in val_grads]
    total = list(term)
    for _ in range(terms):
        products = torch.autograd.grad(phi, params, grad_outputs=term, retain_graph=True, allow_unused=True)
        term = [p - step * (p - (pj if pj is not None else torch.zeros_like(p))) for p, pj in zip(term, products)]
        total = [t + p for t, p in zip(total, term)]
    grads = torch.autograd.grad(phi, leaves, grad_outputs=[step * t for t in total], allow_unused=True)
    return [grad if grad is not None else torch.zeros_like(leaf) for grad, leaf in zip(grads, leaves)]


def loss_and_gradient(model: MultiLoRAModel, task: Task, examples: list[dict], tensors: list[torch.Tensor],
                      batch_size: int) -> tuple[list[float], list[torch.Tensor]]:
    """Each run's mean loss over all of ``examples`` (batches weighted by their loss units, so it equals the pooled
    mean) and the gradient of their sum with respect to ``tensors`` (each run's slice is its own loss's gradient,
    the runs' parameters being disjoint), in the caller's autocast if any."""
    device = model_device(model)
    batches = list(iterate_batches(examples, task.collate, batch_size))
    units = [float(task.loss_units(batch).sum()) for batch in batches]
    total_units = sum(units)
    loss_sum = torch.zeros(model.run_count)
    grads = [torch.zeros_like(tensor) for tensor in tensors]
    for batch, weight in zip(batches, units):
        if weight == 0:
            continue
        loss = model(**to_device(batch, device)).loss * (weight / total_units)
        for grad, part in zip(grads, torch.autograd.grad(loss.sum(), tensors, allow_unused=True)):
            if part is not None:
                grad += part
        loss_sum += loss.detach().cpu()
    return loss_sum.tolist(), grads


# --- one client's meta-training ------------------------------------------------------------------------------------


@dataclass
class FedL2PConfig:
    """FedL2P's meta-training settings, the paper's values by default; the inner LoRA fine-tuning (learning rate,
    epochs, batch size, LoRA seed, target modules) comes from ``personalize``. ``seed`` draws the meta-nets' init."""

    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    outer_steps: int = 3
    neumann_terms: int = 3
    neumann_step: float = 0.1
    meta_lr: float = 1e-4
    base_lr_lr: float = 1e-6
    max_grad_norm: float = 1.0
    validation_fraction: float = 0.2
    seed: int = 0
    # Per budget (a string key, as JSON keeps it), a factor on the meta-net's starting base rates: the benchmark
    # starts each budget's meta-net where uniform LoRA's chosen rate for that budget is, when selection chose per
    # budget (``Stage.takes_budget_lr_scales``); 1 for a budget not listed.
    budget_lr_scales: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.validation_fraction < 1:
            raise FedP2EFTError(f"fedl2p: validation_fraction must lie in (0, 1), got {self.validation_fraction}")
        if self.outer_steps < 1 or self.neumann_terms < 0 or self.neumann_step <= 0:
            raise FedP2EFTError("fedl2p: outer_steps must be >= 1, neumann_terms >= 0 and neumann_step > 0")

    @classmethod
    def from_dict(cls, raw: dict) -> FedL2PConfig:
        """From a YAML/JSON mapping (``personalize`` nested); unknown keys are named in the error."""
        raw = dict(raw)
        personalize = PersonalizeConfig.from_dict(raw.pop("personalize", {}))
        return config_from_mapping(cls, {**raw, "personalize": personalize}, "fedl2p.training")


def stacked_tensors(model: MultiLoRAModel, module_names: Sequence[str]) -> list[torch.Tensor]:
    """Every run's LoRA factors in the meta-net's output order, stacked over runs: for each module, its A (K x rank x
    in) then its B (K x out x rank); a run with a smaller rank is zero-padded there, and its padding gets no
    gradient (``StackedLoRALinear``)."""
    return [tensor for name in module_names for tensor in (model.layers[name].a_all, model.layers[name].b_all)]


def sgd_step_map(model: MultiLoRAModel, batch: dict[str, torch.Tensor]
                 ) -> Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]]:
    """Phi(theta, lrs) = theta - lrs (.) grad_theta L(theta; batch) for every run of ``model`` at once: one SGD step
    with per-tensor learning rates, the update map ``implicit_hypergradient`` differentiates. ``hparams[0]`` holds
    run k's rates in row k (K x tensors); ``tensors`` are the stacked factors of ``stacked_tensors``. The loss is the
    sum of the runs' losses, so the map is run k's own map on run k's slice: its Jacobian is block diagonal over
    runs, and the hypergradient of every run comes out of one double backward."""
    device = model_device(model)
    batch = to_device(batch, device)

    def update(tensors: list[torch.Tensor], hparams: list[torch.Tensor]) -> list[torch.Tensor]:
        rates = hparams[0].to(device)
        grads = torch.autograd.grad(model(**batch).loss.sum(), tensors, create_graph=True)
        return [tensor - rates[:, i].view(-1, 1, 1) * grad for i, (tensor, grad) in enumerate(zip(tensors, grads))]

    return update


def validation_hypergradient(model: MultiLoRAModel, task: Task, module_names: Sequence[str], validation: list[dict],
                             batch: dict[str, torch.Tensor], rates: torch.Tensor, config: FedL2PConfig
                             ) -> tuple[list[float], torch.Tensor]:
    """Each run's validation loss at its fine-tuned LoRA and the hypergradient of that loss with respect to its
    per-tensor learning rates (``rates``: K x tensors in ``stacked_tensors`` order of ``module_names``; the result
    has the same shape), with the update map one SGD step on ``batch`` (``sgd_step_map``) and the Neumann settings
    of ``config``.

    Computed in the task's precision: under bf16 (where the hardware has it natively) it ran 1.7-1.9x faster than in
    float32 on the embedded model and the hypergradient of every budget pointed where float32's did (cosine 1.0000,
    same sign everywhere; ``benchmarks/many_adapters.py --fedl2p``). The meta-nets, their Adam step and the
    learning rates stay float32."""
    tensors = stacked_tensors(model, module_names)
    # The fused attention kernels have no double backward; the math kernel computes the same attention.
    with sdpa_kernel(SDPBackend.MATH), autocast_for(model_device(model), task.precision):
        loss, val_grads = loss_and_gradient(model, task, validation, tensors, config.personalize.batch_size)
        (hypergrads,) = implicit_hypergradient(sgd_step_map(model, batch), tensors, [rates], val_grads,
                                               terms=config.neumann_terms, step=config.neumann_step)
    return loss, hypergrads


def rate_run(spec: MetaNetSpec, rates: torch.Tensor, seed: int) -> LoRARun:
    """The fresh rank-r LoRA of ``spec`` (init drawn from ``seed``) with tensor i learning at ``rates[i]``."""
    values = rates.detach().cpu().tolist()
    return LoRARun({name: spec.budget for name in spec.module_names}, sum(values) / len(values), seed,
                   tensor_lrs={name: (values[2 * i], values[2 * i + 1]) for i, name in enumerate(spec.module_names)})


def fine_tune_at_rates(base_model: nn.Module, task: Task, specs: Sequence[MetaNetSpec],
                       rates: Sequence[torch.Tensor], examples: list[dict], settings: PersonalizeConfig
                       ) -> MultiLoRAModel:
    """Fresh rank-r LoRAs of ``specs`` (init drawn from ``settings.seed``), run k's tensor i learning at
    ``rates[k][i]``, fine-tuned together on ``examples`` with ``settings``' epochs, batch size and seed (plain AdamW):
    the fine-tune whose validation loss FedL2P differentiates."""
    model = MultiLoRAModel(base_model, task, [rate_run(spec, rate, settings.seed) for spec, rate in zip(specs, rates)])
    train(model, task, examples, model.optimizer(), settings.epochs, settings.batch_size, seed=settings.seed)
    return model


def meta_update(metanets: Sequence[LRMetaNet], base_model: nn.Module, task: Task, train_examples: list[dict],
                features: torch.Tensor, config: FedL2PConfig, seed: int) -> list[dict[str, float]]:
    """One client's meta-training in one round (FedL2P, Lee et al. 2023), in place on every meta-net of
    ``metanets`` (one per budget, as the paper trains them), all of them together in one pass per step
    (``MultiLoRAModel``; as many per pass as ``runs_per_pass`` allows).

    The client's training examples are split (seeded by ``seed``) into inner-train and validation. ``outer_steps``
    times: a fresh rank-r LoRA with the same init every time (``config.personalize.seed``) is fine-tuned on
    inner-train with the meta-net's current per-tensor learning rates (plain AdamW, values detached); then the
    hypergradient of the validation loss with respect to those learning rates is taken by
    ``implicit_hypergradient`` at the fine-tuned weights, with the update map chosen as one SGD step on one seeded
    batch of inner-train, Phi(theta, lrs) = theta - lrs (.) grad L_train(theta) (``sgd_step_map``; AdamW's own step
    is not differentiated), in the task's precision (``validation_hypergradient``). It is chained through the
    learning rates into the meta-net and the base learning rates, the total gradient norm is clipped to
    ``max_grad_norm``, and one Adam step is taken (net at ``meta_lr``, base learning rates at ``base_lr_lr``, fresh
    state per call); base learning rates are kept >= 0. The meta-nets share
    the batches and their order; their parameters are disjoint, so each is updated as it would be alone.

    Returns, per meta-net, the validation loss after fine-tuning at the first and at the last outer step
    (``val_loss_before``, ``val_loss_after``: before any and after ``outer_steps - 1`` updates of this call), their
    mean over all outer steps, and the mean multiplier and learning rate of the updated meta-net."""
    settings = config.personalize
    inner, validation = validation_split(train_examples, config.validation_fraction, seed)
    per_pass = runs_per_pass(ClientContext(base_model, task, inner), settings.batch_size)
    results = []
    for start in range(0, len(metanets), per_pass):
        results += _meta_update_pass(list(metanets[start:start + per_pass]), base_model, task, inner, validation,
                                     features, config, random.Random(seed))
    return results


def _meta_update_pass(metanets: list[LRMetaNet], base_model: nn.Module, task: Task, inner: list[dict],
                      validation: list[dict], features: torch.Tensor, config: FedL2PConfig,
                      rng: random.Random) -> list[dict[str, float]]:
    """``meta_update`` for meta-nets that fit in one pass."""
    settings = config.personalize
    optimizers = [torch.optim.Adam([{"params": metanet.net_parameters(), "lr": config.meta_lr},
                                    {"params": [metanet.base_lrs], "lr": config.base_lr_lr}]) for metanet in metanets]
    losses, norms = [], []
    for _ in range(config.outer_steps):
        rates = [metanet.learning_rates(features) for metanet in metanets]
        model = fine_tune_at_rates(base_model, task, [metanet.spec for metanet in metanets], rates, inner, settings)
        batch = task.collate(rng.sample(inner, min(settings.batch_size, len(inner))))
        loss, hypergrads = validation_hypergradient(model, task, metanets[0].spec.module_names, validation, batch,
                                                     torch.stack(rates), config)
        losses.append(loss)
        step_norms = []
        for metanet, optimizer, rate, hypergrad in zip(metanets, optimizers, rates, hypergrads):
            optimizer.zero_grad(set_to_none=True)
            rate.backward(hypergrad.to(rate.device))
            step_norms.append(float(nn.utils.clip_grad_norm_(list(metanet.parameters()), config.max_grad_norm)))
            optimizer.step()
            with torch.no_grad():
                metanet.base_lrs.clamp_(min=0.0)
        norms.append(step_norms)
        del model
    results = []
    for index, metanet in enumerate(metanets):
        with torch.no_grad():
            multipliers = metanet(features)
            final_rates = multipliers * metanet.base_lrs
        own = [step[index] for step in losses]
        results.append({"val_loss_before": own[0], "val_loss_after": own[-1], "val_loss": sum(own) / len(own),
                        "hypergrad_norm": sum(step[index] for step in norms) / len(norms),
                        "mean_multiplier": float(multipliers.mean()), "mean_lr": float(final_rates.mean())})
    return results


# --- the federated job ---------------------------------------------------------------------------------------------


class FedL2PTask:
    """FedL2P's federated job over the seen clients; implements ``FederatedTask`` (and ``export``).

    The weights are the meta-nets of every budget in one state dict, keys prefixed ``r{budget}.``, so one federated
    run trains one meta-net per budget as the paper does. ``clients`` are objects with a ``.train`` list.

    Early stopping as in the paper: ``best_metric`` names the validation loss after fine-tuning with the meta-nets
    a round starts from (mean over budgets), so the engine keeps the meta-nets with the lowest one."""

    best_metric = "val_loss_before"

    def __init__(self, base_model: nn.Module, task: Task, clients: Sequence, config: FedL2PConfig,
                 base_model_name: str, budgets: Sequence[int]) -> None:
        if not budgets:
            raise FedP2EFTError("FedL2P needs at least one rank budget to train a meta-net for")
        self.base_model = base_model
        self.task = task
        self.clients = list(clients)
        self.config = config
        self.specs = {budget: metanet_spec(base_model, config.personalize, base_model_name, budget)
                      for budget in sorted(set(budgets))}
        self._features: dict[int, torch.Tensor] = {}

    def num_clients(self) -> int:
        return len(self.clients)

    @staticmethod
    def prefix(budget: int) -> str:
        return f"r{budget}."

    def initial_weights(self) -> dict[str, torch.Tensor]:
        torch.manual_seed(self.config.seed)
        weights = {}
        for budget, spec in self.specs.items():
            base_lr = self.config.personalize.lora_lr * self.config.budget_lr_scales.get(str(budget), 1.0)
            metanet = LRMetaNet(spec, base_lr=base_lr)
            weights.update({self.prefix(budget) + key: value for key, value in metanet.state_dict().items()})
        return weights

    def metanet(self, weights: dict[str, torch.Tensor], budget: int) -> LRMetaNet:
        """The meta-net of ``budget`` held in the global ``weights``."""
        prefix = self.prefix(budget)
        metanet = LRMetaNet(self.specs[budget])
        metanet.load_state_dict({key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)})
        return metanet

    def features(self, client_index: int) -> torch.Tensor:
        """x depends only on the fixed base model and the client's data (and every budget reads the same layers),
        so it is computed once per client."""
        if client_index not in self._features:
            spec = next(iter(self.specs.values()))
            self._features[client_index] = features_for(self.base_model, self.task,
                                                        self.clients[client_index].train, spec)
        return self._features[client_index]

    def client_update(self, weights: dict[str, torch.Tensor], client_index: int, server_round: int) -> ClientUpdate:
        """``meta_update`` of every budget's meta-net on this client, all of them in one pass per step. The client's
        inner-train/validation split is the same in every round (seeded by the config's seed and the client), as a
        client's held-out data would be."""
        config = self.config
        torch.manual_seed(config.seed * 100_003 + server_round * 1_009 + client_index)
        client = self.clients[client_index]
        features = self.features(client_index)
        new_weights: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        metanets = {budget: self.metanet(weights, budget) for budget in self.specs}
        results = meta_update(list(metanets.values()), self.base_model, self.task, client.train, features, config,
                              seed=config.seed * 100_003 + client_index)
        for (budget, metanet), result in zip(metanets.items(), results):
            new_weights.update({self.prefix(budget) + key: value.detach().clone()
                                for key, value in metanet.state_dict().items()})
            metrics.update({f"{key}_r{budget}": value for key, value in result.items()})
        for key in ("val_loss_before", "val_loss_after", "val_loss", "mean_multiplier", "mean_lr"):
            metrics[key] = sum(metrics[f"{key}_r{budget}"] for budget in self.specs) / len(self.specs)
        return ClientUpdate(new_weights, len(client.train), metrics)

    def export(self, weights: dict[str, torch.Tensor], directory: Path) -> Path:
        """One file per budget, ``directory/fedl2p-r{budget}.safetensors`` (with its JSON header); returns
        ``directory``."""
        directory = Path(directory)
        for budget in self.specs:
            self.metanet(weights, budget).save(metanet_file(directory, budget))
        return directory
