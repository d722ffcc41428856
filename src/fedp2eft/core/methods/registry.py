"""What a personalization method is, as far as the rest of the project is concerned (in the spirit of PEFT's
tuners: one file per method, one line in ``METHODS`` in ``__init__.py``).

A method declares its name, how it personalizes a client under a budget, which learning rate of the config is
its own, what it reports per run, and, optionally, the federated stage whose artifact it needs (the PS
generator, FedL2P's meta-nets, ...). The benchmark runner, the report and the CLI read these declarations, so
adding a method touches nothing else."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from fedp2eft.core.federation import FederatedTask
from fedp2eft.core.personalization import ClientContext, PersonalizeConfig, Personalized, RunPlan
from fedp2eft.core.tasks import Task
from fedp2eft.data.types import ClientData


@dataclass(frozen=True)
class Stage:
    """A federated job (Flower, seen pool) whose artifact a method personalizes with.

    ``name`` is the stage's config section (``psg:``), task name, CLI command (``train-<name>``) and run folder
    (``seed<s>/<name>/``); ``title`` says what it trains, for help texts.
    ``build(base_model, task, seen_clients, training, base_model_name, budgets)`` makes the engine-free job from
    the section's ``training`` mapping (plus ``personalize`` and ``seed``, and ``total_rounds`` when ``config_class``
    has that field); ``config_class`` is that mapping's dataclass. ``load(path, base_model, config,
    base_model_name)`` reads the exported artifact and refuses one made for another model. ``defaults`` are the
    section's defaults; ``how_to_get`` tells a user without the artifact how to make one. ``max_rank(path)``, for an
    artifact made for one maximum rank R (the PS generator outputs R scales per module), reads that R, so a user
    need not repeat it; None for a stage whose artifacts fit any R.

    ``grid_field`` names a learning rate of ``config_class`` that the benchmark can select like a method's own
    (section key ``select_on_grid``): the stage is then trained once per point of the run's grid, at that rate times
    the point, its methods are validated with each artifact, and each budget personalizes with the artifact of the
    point chosen for it; ``load`` then reads a folder of such artifacts (``grid_point_folder``) and the method finds
    its point as ``PersonalizeConfig.own_lr_scale`` (FedL2P's meta learning rate)."""

    name: str
    title: str
    build: Callable[[nn.Module, Task, list[ClientData], dict, str, list[int]], FederatedTask]
    config_class: type
    load: Callable[[Path, nn.Module, PersonalizeConfig, str], Any]
    defaults: dict
    how_to_get: str
    max_rank: Callable[[Path], int] | None = None
    grid_field: str | None = None

    @property
    def counts_rounds(self) -> bool:
        """Whether the stage's settings take the run's round count (``total_rounds``, e.g. for a warm-up share)."""
        return "total_rounds" in {f.name for f in fields(self.config_class)}

    @property
    def takes_budget_lr_scales(self) -> bool:
        """Whether the stage's settings take, per budget, the learning-rate scale chosen for that budget relative to
        the stage's own (``budget_lr_scales``; FedL2P starts each budget's meta-net at uniform LoRA's rate)."""
        return "budget_lr_scales" in {f.name for f in fields(self.config_class)}


def grid_point_folder(stage_folder: Path, point: float) -> Path:
    """Where a stage trained at grid point ``point`` of its ``grid_field`` keeps its artifact: ``x<point>/``."""
    return Path(stage_folder) / f"x{point:g}"


def grid_point_folders(stage_folder: Path) -> dict[float, Path]:
    """The grid points a stage folder holds artifacts for (``grid_point_folder``), by point; empty for the folder of
    a stage trained once."""
    folders = Path(stage_folder).glob("x*") if Path(stage_folder).is_dir() else []
    points = {}
    for folder in folders:
        try:
            points[float(folder.name[1:])] = folder
        except ValueError:
            continue
    return dict(sorted(points.items()))


@dataclass(frozen=True)
class MethodSpec:
    """One personalization method: ``personalize(context, budget, config)``; ``settings`` is the dataclass of its
    own settings, if it has any (its fields are keys of the ``personalize:`` section beside the shared ones, its
    defaults theirs; a field with ``LEARNING_RATE`` metadata scales with the others); ``lr_field`` names the
    learning rate that selection chooses for it, a field of ``PersonalizeConfig`` or of ``settings`` (None for a
    method that learns its own: learning-rate selection skips it); ``reports`` lists per-run fields for the
    results (``ranks`` and keys of ``Personalized.report``).

    A LoRA-shaped method also gives ``plan(context, budget, config)``: the same run described, not trained, so
    that a client's runs train together in one pass (``core/multi_lora.py``); ``prepare(context, configs)`` does
    the work its plans share for several configs at once (BT-LoRA's searches).

    ``ablation_of`` marks a method as a variant of another one that measures one of its parts (e.g. FedP²EFT's
    ranks without its multipliers): reports list it apart from the baselines and never count it as one."""

    name: str
    personalize: Callable[[ClientContext, int, PersonalizeConfig], Personalized]
    lr_field: str | None = "lora_lr"
    reports: tuple[str, ...] = ()
    stage: Stage | None = None
    plan: Callable[[ClientContext, int, PersonalizeConfig], RunPlan] | None = None
    prepare: Callable[[ClientContext, list[PersonalizeConfig]], None] | None = None
    ablation_of: str | None = None
    settings: type | None = None
