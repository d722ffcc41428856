"""Many LoRA runs of one client trained and evaluated in one pass over one frozen base model (docs/method.md,
"Many adapters in one pass").

A client's personalization runs (methods x budgets x learning-rate scales) share the frozen base model, the
client's data and, within a seed, the order of its batches. PEFT trains one adapter per forward pass (it refuses a
training batch that mixes adapters), so each run streams every frozen weight for ~100 tokens. Here K runs go through
the base together: the batch is repeated once per run (run-major rows), every adapted linear applies its frozen
weight once to all K copies (one large matmul) and each run's LoRA as two batched matmuls, and the loss is the sum of
the runs' losses. Parameters are disjoint, so each run's gradient is its own loss's gradient and the result equals K
separate runs to float rounding.

Each run keeps its own ranks per module (padded to the module's largest rank, padded ranks gated to exactly 0), its
own per-rank multipliers lambda (fixed, or trainable under BayesTune's priors for a search), its own learning rates
and optimizer state (AdamW, one parameter group per run), and starts from the LoRA init PEFT draws for its ranks and
seed. The base model's dropout (hidden and attention probabilities) draws one mask per batch and shares it among the
runs, so every run sees the masks a separate run with the same seed draws on the CPU. A trained run exports to a
standard PEFT adapter (``export``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import AdaLoraConfig, PeftModel
from torch import nn
from torch.nn.functional import pad

from fedp2eft.core.btlora import LORA_SCALING, PriorConfig, attach_adalora, attach_lora, clamp_ste
from fedp2eft.core.modeling import ClassifierOutput, frozen_copy
from fedp2eft.core.rank_allocation import RankAllocation
from fedp2eft.core.shared_dropout import share_dropout_masks


@dataclass
class LoRARun:
    """One run: ``ranks`` per module (modules not named get no LoRA), the fixed per-rank multipliers ``scales`` of
    the kept ranks (None: all 1, plain LoRA), LoRA's learning rate ``lr`` and the ``seed`` of its init. With
    ``scale_lr`` the multipliers are trained at that rate under BayesTune's ``priors`` (a search). ``tensor_lrs``
    gives each module's A and B their own learning rates instead of ``lr`` (FedL2P). ``adalora`` makes the run
    PEFT's AdaLoRA of that config (``ranks`` = its ``init_r``): the multipliers are its singular values E, trained at
    ``lr`` and unclamped, with its orthogonality penalty and its rank allocation after every step. ``start`` gives
    every module's starting (A, B) instead of PEFT's init (a nested-rank LoRA's leading components)."""

    ranks: dict[str, int]
    lr: float
    seed: int
    scales: dict[str, torch.Tensor] | None = None
    scale_lr: float | None = None
    priors: PriorConfig | None = None
    tensor_lrs: dict[str, tuple[float, float]] | None = None
    adalora: AdaLoraConfig | None = None
    start: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def searches(self) -> bool:
        return self.scale_lr is not None

    @property
    def init_key(self) -> tuple:
        if self.start is not None:
            return ("start", id(self.start))
        return tuple(sorted(self.ranks.items())), self.seed, self.adalora is not None


@dataclass
class Factors:
    """One run's part of a module: A (rank x in), B (out x rank), its multipliers, whether they train, whether they
    are used as they are (AdaLoRA's E) rather than clamped (BayesTune's lambda), and the constant they are scaled by."""

    a: torch.Tensor
    b: torch.Tensor
    scales: torch.Tensor
    trainable: bool = False
    raw: bool = False
    scaling: float = LORA_SCALING


class StackedLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus K LoRA runs: ``base(x) + scaling * B_k diag(lambda_k) A_k x_k`` for the k-th
    block of rows of ``x``.

    The runs' factors live in stacked tensors (``a_all``: K x rank x in, ``b_all``: K x out x rank, ``scale_all``:
    K x rank, rank = the largest of the runs', a run's padding zero and gated off), so a pass costs two batched
    matmuls and no copies. Run k's own tensors (``a[k]``, ``b[k]``, ``scale[k]``; rank 0 where the run has no LoRA
    here) are views of that storage: the optimizer updates them, with the run's own learning rate, in place, after
    ``share_gradients`` has pointed their gradients at the stacked gradients' slices."""

    def __init__(self, base: nn.Linear, factors: Sequence[Factors]) -> None:
        super().__init__()
        self.base = base
        rank = max(f.a.shape[0] for f in factors)
        self.a_all = nn.Parameter(torch.stack([pad(f.a.detach(), (0, 0, 0, rank - f.a.shape[0])) for f in factors]))
        self.b_all = nn.Parameter(torch.stack([pad(f.b.detach(), (0, rank - f.b.shape[1])) for f in factors]))
        self.scale_all = nn.Parameter(torch.stack([pad(f.scales.detach().float(), (0, rank - f.scales.shape[0]),
                                                       value=1.0) for f in factors]),
                                      requires_grad=any(f.trainable for f in factors))
        real = torch.stack([pad(torch.ones(f.a.shape[0]), (0, rank - f.a.shape[0])) for f in factors])
        scaling = torch.tensor([[f.scaling] for f in factors], dtype=torch.float64)
        self.register_buffer("gate_mask", (real * scaling).float().to(self.a_all.device), persistent=False)
        raw = torch.tensor([[f.raw] for f in factors])
        self.register_buffer("raw_rows", raw.to(self.a_all.device) if raw.any() else None, persistent=False)
        self.register_buffer("b0", self.b_all.detach().clone(), persistent=False)
        self.register_buffer("fixed_gates", clamp_ste(self.scale_all.detach()) * self.gate_mask, persistent=False)
        self.a, self.b, self.scale = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        for f in factors:
            width = f.a.shape[0]
            self.a.append(nn.Parameter(torch.empty(0), requires_grad=width > 0))
            self.b.append(nn.Parameter(torch.empty(0), requires_grad=width > 0))
            self.scale.append(nn.Parameter(torch.empty(0), requires_grad=f.trainable and width > 0))
        self.widths = [f.a.shape[0] for f in factors]
        self._bind_views()

    def _bind_views(self) -> None:
        """Point every run's tensors at their slices of the stacked storage."""
        for run, width in enumerate(self.widths):
            self.a[run].data = self.a_all.data[run, :width]
            self.b[run].data = self.b_all.data[run, :, :width]
            self.scale[run].data = self.scale_all.data[run, :width]

    def _apply(self, fn, recurse: bool = True):
        """Moving or casting the module (``.to``) makes new stacked tensors: bind the runs' views to them again."""
        super()._apply(fn, recurse)
        self._bind_views()
        return self

    def gates(self) -> torch.Tensor:
        """K x rank: each run's multipliers (clamped, or as they are for AdaLoRA's E) times its scaling, 0 on padded
        ranks."""
        if not self.scale_all.requires_grad:
            return self.fixed_gates
        scales = clamp_ste(self.scale_all)
        if self.raw_rows is not None:
            scales = torch.where(self.raw_rows, self.scale_all, scales)
        return scales * self.gate_mask

    def orthogonality(self, rows: torch.Tensor) -> torch.Tensor:
        """For the runs ``rows``, AdaLoRA's penalty terms here: ||A A^T - I||_F + ||B^T B - I||_F over each run's own
        ranks (its padding is zero, and so is the identity's diagonal there)."""
        a, b = self.a_all[rows], self.b_all[rows]
        identity = torch.diag_embed((self.gate_mask[rows] > 0).to(a.dtype))
        return (torch.linalg.matrix_norm(a @ a.transpose(1, 2) - identity)
                + torch.linalg.matrix_norm(b.transpose(1, 2) @ b - identity))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        hidden = torch.bmm(x.reshape(len(self.a_all), -1, x.shape[-1]), self.a_all.transpose(1, 2))
        return result + torch.bmm(hidden * self.gates()[:, None], self.b_all.transpose(1, 2)).reshape(result.shape)

    def share_gradients(self) -> None:
        """Give every run's own tensors the slices of the stacked gradients that belong to them."""
        for own, stacked in ((self.a, self.a_all), (self.b, self.b_all), (self.scale, self.scale_all)):
            for run, parameter in enumerate(own):
                if parameter.requires_grad and stacked.grad is not None:
                    parameter.grad = stacked.grad[run][tuple(slice(0, n) for n in parameter.shape)]

    def clear_gradients(self) -> None:
        self.a_all.grad = self.b_all.grad = self.scale_all.grad = None

    def prior_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per run, BayesTune's sums in this module (docs/method.md, "BT-LoRA"): sum_i ||B[:,i] - B0[:,i]||_1 /
        lambda_i, sum_i log lambda_i and sum_i lambda_i over the run's real ranks."""
        real = (self.gate_mask > 0).to(self.scale_all.dtype)
        scales = clamp_ste(self.scale_all)
        if self.raw_rows is not None:  # AdaLoRA's E may be 0 or negative: no prior for it (weight 0), no NaN either
            scales = torch.where(self.raw_rows, torch.ones_like(scales), scales)
        change = (self.b_all - self.b0).abs().sum(1)
        return (change / scales * real).sum(1), (scales.log() * real).sum(1), (scales * real).sum(1)


def _factors_of(module: nn.Module, adalora: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A PEFT layer's (A, B, E) for its default adapter: AdaLoRA keeps them as bare parameters, LoRA as linears."""
    if adalora:
        return (module.lora_A["default"].detach(), module.lora_B["default"].detach(),
                module.lora_E["default"].detach().flatten())
    return module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach(), None


INIT_CACHE_SIZE = 16  # LoRA inits kept per process: a client's budgets and rank maps, a few MB each
_inits: OrderedDict[tuple, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = OrderedDict()


def peft_init(base_model: nn.Module, ranks: dict[str, int], seed: int, adalora: AdaLoraConfig | None = None
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(A, B, E) of every module as PEFT initialises a LoRA with ``ranks`` from ``seed`` (E is None), or, with an
    ``adalora`` config, its AdaLoRA (E: its singular values, flattened): the library's own init, so a batched run
    starts where a separate one does. Read-only: the result is shared.

    The init depends only on which modules get which rank, their shapes, the kind and the seed (PEFT draws the
    factors from the seeded stream module by module), never on the base weights' values, so it is drawn once per
    process and layout and reused: wrapping the model with PEFT costs ~0.3 s on multilingual-e5-small, about a tenth
    of a personalization run, and a client's runs, FedL2P's outer steps and every client's uniform-rank LoRA repeat
    the same few layouts."""
    modules = dict(base_model.named_modules())
    layout = tuple((name, rank, tuple(modules[name].weight.shape), modules[name].weight.dtype,
                    str(modules[name].weight.device)) for name, rank in sorted(ranks.items()) if name in modules)
    key = (type(base_model).__name__, layout, seed, adalora is not None)
    if key in _inits:
        _inits.move_to_end(key)
        return _inits[key]
    peft_model = (attach_lora(frozen_copy(base_model), ranks, LORA_SCALING, seed=seed) if adalora is None
                  else attach_adalora(frozen_copy(base_model), adalora, seed))
    adapted = dict(peft_model.base_model.model.named_modules())
    init = {name: _factors_of(adapted[name], adalora is not None) for name in ranks}
    _inits[key] = init
    if len(_inits) > INIT_CACHE_SIZE:
        _inits.popitem(last=False)
    return init


class MultiLoRAModel(nn.Module):
    """K LoRA runs on one shared, frozen copy of ``base_model``; ``forward`` takes one batch and returns every
    run's loss (a vector of K) and the logits of all K copies (run-major rows). ``task`` supplies the per-run loss;
    ``carry`` names the modules a run's exported adapter carries (a classifier's head)."""

    def __init__(self, base_model: nn.Module, task, runs: list[LoRARun], carry: Sequence[str] = ()) -> None:
        super().__init__()
        self.task, self.runs, self.carry = task, list(runs), list(carry)
        self.__dict__["base_model"] = base_model  # not a submodule: train()/eval() here must not switch its mode
        self.model = frozen_copy(base_model).requires_grad_(False)
        inits: dict[tuple, dict] = {}  # runs with the same ranks and seed start from the same init
        for run in runs:
            if run.init_key in inits:
                continue
            if run.start is not None:
                inits[run.init_key] = {name: (a, b, None) for name, (a, b) in run.start.items()}
            else:
                inits[run.init_key] = peft_init(base_model, {n: r for n, r in run.ranks.items() if r > 0}, run.seed,
                                                run.adalora)
        adapted = [name for name, module in self.model.named_modules()
                   if isinstance(module, nn.Linear) and any(run.ranks.get(name, 0) for run in runs)]
        self.layers: dict[str, StackedLoRALinear] = {}
        for name in adapted:
            base = self.model.get_submodule(name)
            factors = [self._factors(base, name, run, inits[run.init_key]) for run in runs]
            self.layers[name] = StackedLoRALinear(base, factors)
            parent, _, attribute = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, attribute, self.layers[name])
        if len(runs) > 1:
            share_dropout_masks(self.model, len(runs))
        self.allocator = RankAllocation(self) if any(run.adalora for run in runs) else None

    @staticmethod
    def _factors(base: nn.Linear, name: str, run: LoRARun, init: dict) -> Factors:
        rank = run.ranks.get(name, 0)
        if rank == 0:
            return Factors(base.weight.new_zeros(0, base.in_features), base.weight.new_zeros(base.out_features, 0),
                           base.weight.new_zeros(0))
        a, b, singular_values = init[name]
        if run.adalora is not None:  # PEFT's SVDLinear: B diag(E) A x * alpha / (init_r + 1e-5)
            alpha = run.adalora.lora_alpha if run.adalora.lora_alpha > 0 else float(rank)
            return Factors(a, b, singular_values, trainable=True, raw=True, scaling=alpha / (rank + 1e-5))
        scales = run.scales[name] if run.scales is not None else torch.ones(rank)
        return Factors(a, b, scales.to(a.device), trainable=run.searches)

    @property
    def run_count(self) -> int:
        return len(self.runs)

    def forward(self, labels: torch.Tensor | None = None, **inputs: torch.Tensor) -> ClassifierOutput:
        tiled = {key: value.repeat(self.run_count, *[1] * (value.dim() - 1)) for key, value in inputs.items()}
        logits = self.model(**tiled).logits
        loss = None if labels is None else self.task.run_losses(logits, labels, self.run_count)
        if loss is not None and self.allocator is not None and self.training:
            loss = loss + self.allocator.orthogonality_penalty()
        return ClassifierOutput(loss=loss, logits=logits)

    def forward_rows(self, **inputs):
        """The base with every run's LoRA on inputs whose rows are already run-major (K copies of a batch that
        diverge per run, as greedy generation's do); the model's own output, its key/value cache included."""
        return self.model(**inputs)

    def run_parameters(self, run: int, scales: bool = False) -> list[nn.Parameter]:
        """Run ``run``'s trainable LoRA factors (or, with ``scales``, its trainable multipliers)."""
        if scales:
            return [layer.scale[run] for layer in self.layers.values() if layer.scale[run].requires_grad]
        return [p for layer in self.layers.values() for p in (layer.a[run], layer.b[run]) if p.requires_grad]

    def optimizer(self) -> torch.optim.AdamW:
        """AdamW (weight decay 0) with each run's own learning rates: one group for its LoRA (or one per tensor),
        one for its multipliers when it searches."""
        groups = []
        for index, run in enumerate(self.runs):
            if run.tensor_lrs is not None:
                groups += [{"params": [tensor], "lr": lr} for name, layer in self.layers.items() if run.ranks.get(name)
                           for tensor, lr in zip((layer.a[index], layer.b[index]), run.tensor_lrs[name])]
            else:
                groups.append({"params": self.run_parameters(index), "lr": run.lr})
            if run.searches or run.adalora is not None:
                groups.append({"params": self.run_parameters(index, scales=True),
                               "lr": run.scale_lr if run.searches else run.lr})
        # foreach: one call per group over its tensors, not one per tensor (a pass's steps 1.65 -> 1.0 s on the main
        # job's 8 runs); not fused: that kernel gets a run's strided views wrong (docs/method.md, "The main job's
        # arithmetic")
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0, foreach=True)
        optimizer.register_step_pre_hook(self._share_gradients)
        if self.allocator is not None:  # after the step, while the stacked gradients are still there
            self.allocator.restart()
            optimizer.register_step_post_hook(lambda *_: self.allocator.step())
        optimizer.register_step_post_hook(self._clear_gradients)
        return optimizer

    def _share_gradients(self, *_) -> None:
        for layer in self.layers.values():
            layer.share_gradients()

    def _clear_gradients(self, *_) -> None:
        for layer in self.layers.values():
            layer.clear_gradients()

    def prior_loss(self, num_examples: int) -> torch.Tensor:
        """The sum over searching runs of BayesTune's prior, each run with its own weights (0 for the others)."""
        weights = [(run.priors or PriorConfig()) if run.searches else PriorConfig(0.0, 0.0, 0.0) for run in self.runs]
        device = next(iter(self.layers.values())).a_all.device
        significance_weight = torch.tensor([w.significance_weight for w in weights], device=device)
        sparsity_weight = torch.tensor([w.sparsity_weight for w in weights], device=device)
        rate = torch.tensor([w.gamma_rate for w in weights], device=device)
        total = torch.zeros(len(self.runs), device=device)
        for layer in self.layers.values():
            change, logs, sums = layer.prior_terms()
            total = total + significance_weight * change + sparsity_weight * (logs + rate * sums)
        return total.sum() / num_examples

    def scales(self, run: int) -> torch.Tensor:
        """Run ``run``'s Lambda: its clamped multipliers of every module it adapts, concatenated in module order."""
        return torch.cat([clamp_ste(layer.scale[run]) for layer in self.layers.values() if layer.scale[run].numel()])

    def kept_ranks(self, run: int) -> dict[str, int]:
        """The ranks run ``run`` ends with: its own, or for AdaLoRA the singular values its allocation kept."""
        if self.runs[run].adalora is None:
            return dict(self.runs[run].ranks)
        return {name: int((layer.scale[run] != 0).sum()) for name, layer in self.layers.items()
                if layer.widths[run]}

    def trainable_count(self, run: int) -> int:
        return sum(p.numel() for p in self.run_parameters(run) + self.run_parameters(run, scales=True))

    def export(self, run: int) -> PeftModel:
        """Run ``run`` as a standard PEFT adapter on a copy of the base model, which saves with ``save_pretrained``
        and computes what the run computes: a LoRA (its multipliers folded into B) or its AdaLoRA."""
        spec = self.runs[run]
        ranks = {name: rank for name, rank in spec.ranks.items() if rank > 0}
        peft_model = (attach_adalora(frozen_copy(self.base_model), spec.adalora, spec.seed) if spec.adalora
                      else attach_lora(frozen_copy(self.base_model), ranks, LORA_SCALING, seed=spec.seed,
                                       carry=self.carry))
        modules = dict(peft_model.base_model.model.named_modules())
        with torch.no_grad():
            for name in ranks:
                layer, target = self.layers[name], modules[name]
                if spec.adalora is not None:
                    target.lora_A["default"].copy_(layer.a[run])
                    target.lora_B["default"].copy_(layer.b[run])
                    target.lora_E["default"].copy_(layer.scale[run].view(-1, 1))
                else:
                    target.lora_A["default"].weight.copy_(layer.a[run])
                    target.lora_B["default"].weight.copy_(layer.b[run] * clamp_ste(layer.scale[run]))
        return peft_model.eval()
