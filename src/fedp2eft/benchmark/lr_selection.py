"""Learning-rate selection: every method x budget x grid scale trained on the inner split of some clients' training
data and scored on its validation split (docs/method.md, "Benchmark regime"), the choice per method, and the
scale a federated stage's local training takes from it. Test data are never read."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import fields
from pathlib import Path

from fedp2eft.benchmark.cells import validate_client
from fedp2eft.benchmark.run_folder import grid_trained, read_jsonl, task_config
from fedp2eft.benchmark.workers import WorkerPool, run_jobs
from fedp2eft.core.methods import Stage, method_lr, method_spec, personalize_config, settings_for_stage, stages
from fedp2eft.errors import FedP2EFTError
from fedp2eft.experiment import Setup
from fedp2eft.logs import console

def validation_clients(config: dict, setup: Setup) -> list[int]:
    """Indices (in ``selection.pool``) of the clients whose training data serve learning-rate selection: the
    first ``clients_per_language`` of every language."""
    taken: Counter = Counter()
    chosen = []
    for index, client in enumerate(setup.data.pool(config["selection"]["pool"])):
        if taken[client.language] < config["selection"]["clients_per_language"]:
            taken[client.language] += 1
            chosen.append(index)
    return chosen


def stage_select(config: dict, run_dir: Path, pool: WorkerPool, methods: list[str],
                 artifacts: dict[str, Path]) -> list[dict]:
    """Validation scores of ``methods`` over the whole grid (skipped for a one-point grid)."""
    sink = run_dir / "selection.jsonl"
    done = read_jsonl(sink)
    if len(config["selection"]["grid"]) == 1 or not methods:
        return done
    finished = {(record["client"], tuple(record["methods"])) for record in done}
    setup = Setup.from_config(task_config(config, pool.base_model, {}))
    clients = setup.data.pool(config["selection"]["pool"])
    paths = {name: str(path) for name, path in artifacts.items()}
    jobs = [(index, methods, paths) for index in validation_clients(config, setup)
            if (clients[index].client_id, tuple(methods)) not in finished]
    if jobs:
        console.rule(f"[bold]Stage 2/5: learning-rate selection on validation data: {', '.join(methods)}")
    return done + run_jobs(pool, validate_client, jobs, sink, "validation clients")


def validation_counts(records: list[dict]) -> tuple[dict, dict]:
    """(method, budget, scale) -> correct and count, pooled over the selection clients."""
    correct, count = defaultdict(int), defaultdict(int)
    for record in records:
        for row in record["rows"]:
            key = (row["method"], row["budget"], row["scale"])
            correct[key] += row["correct"]
            count[key] += row["count"]
    return correct, count


def selected_methods(config: dict) -> list[str]:
    """The methods whose learning-rate scale a run selects: its methods, plus a method that the ``lr_scale`` of a
    stage it uses names (e.g. ``psg.lr_scale: btlora`` for ``methods=[fedp2eft]``): selected for that stage's
    training only, never a row of the results."""
    named = [config[stage.name]["lr_scale"] for stage in stages(config["methods"])]
    return config["methods"] + [m for m in dict.fromkeys(named) if isinstance(m, str) and m not in config["methods"]]


def selects_lr(config: dict, method: str) -> bool:
    """Whether selection chooses a learning-rate scale for ``method``: its own learning rate (``lr_field``), or its
    stage's ``grid_field`` (``selected_through_stage``)."""
    return method_spec(method).lr_field is not None or selected_through_stage(config, method)


def selected_through_stage(config: dict, method: str) -> bool:
    """Whether ``method``, which learns its own rates, is selected through its stage's ``grid_field`` in this run
    (the stage trained once per grid point: FedL2P's meta learning rate)."""
    spec = method_spec(method)
    return spec.lr_field is None and spec.stage is not None and grid_trained(config, spec.stage)


def stage_grid_rate(config: dict, stage: Stage) -> float:
    """The configured value of ``stage``'s ``grid_field`` (its config class's default when the profile sets none):
    grid point x1."""
    default = next(item.default for item in fields(stage.config_class) if item.name == stage.grid_field)
    return float(config[stage.name]["training"].get(stage.grid_field, default))


def selected_lr(config: dict, method: str, budget: int, scale: float) -> float | None:
    """The learning rate that grid ``scale`` gives ``method`` at ``budget``: its own (``method_lr``), or, for a
    method selected through its stage's grid, that stage's ``grid_field`` (FedL2P's meta learning rate)."""
    if selected_through_stage(config, method):
        return stage_grid_rate(config, method_spec(method).stage) * scale
    return method_lr(personalize_config(config["personalize"]).with_lr_scale(scale), method, budget)


def stage_points(config: dict, stage: Stage, chosen: dict[str, dict[int, float]] | None = None
                 ) -> list[float] | None:
    """The grid points ``stage`` is trained at: None for a stage trained once; before selection (``chosen`` None)
    every point of the grid, after it only the points chosen for the stage's methods."""
    if not grid_trained(config, stage):
        return None
    if chosen is None:
        return list(config["selection"]["grid"])
    return sorted({chosen[method][budget] for method in config["methods"] if method_spec(method).stage is stage
                   for budget in config["budgets"]})


def chosen_scales(config: dict, records: list[dict]) -> dict[str, dict[int, float]]:
    """Per method, the grid scale with the best pooled validation accuracy (ties: the smaller scale): per budget
    with ``selection.per_budget``, else one scale for all budgets, chosen on the validation rows of every budget
    pooled (four times the data per decision at four budgets; docs/method.md, "Benchmark regime"). With a
    one-point grid that point. A method that learns its own learning rates keeps scale 1 (``selects_lr``)."""
    grid = config["selection"]["grid"]
    correct, count = validation_counts(records)

    def best(method: str, budgets: list[int]) -> float:
        totals = [(sum(correct[(method, b, s)] for b in budgets), sum(count[(method, b, s)] for b in budgets), -i, s)
                  for i, s in enumerate(grid)]
        scored = [(right / seen, order, scale) for right, seen, order, scale in totals if seen]
        return max(scored)[2] if scored else grid[0]

    chosen: dict[str, dict[int, float]] = {}
    for method in selected_methods(config):
        if not selects_lr(config, method):
            chosen[method] = dict.fromkeys(config["budgets"], 1.0)
        elif config["selection"]["per_budget"]:
            chosen[method] = {budget: best(method, [budget]) for budget in config["budgets"]}
        else:
            chosen[method] = dict.fromkeys(config["budgets"], best(method, config["budgets"]))
    return chosen


def write_selection(config: dict, run_dir: Path, records: list[dict], chosen: dict) -> None:
    """``selection.json``: the grid, every grid point's pooled validation score of the task's main metric (named
    under ``metric``; the key stays ``val_accuracy``), and the choice."""
    correct, count = validation_counts(records)
    results = [{"method": m, "budget": b, "scale": s, "lr": selected_lr(config, m, b, s),
                "val_accuracy": correct[(m, b, s)] / count[(m, b, s)], "val_count": count[(m, b, s)]}
               for (m, b, s) in sorted(count)]
    metric = next((row.get("metric", "accuracy") for record in records for row in record["rows"]), "accuracy")
    payload = {"metric": metric, "grid": config["selection"]["grid"],
               "validation_fraction": config["selection"]["validation_fraction"],
               "pool": config["selection"]["pool"], "per_budget": config["selection"]["per_budget"],
               "clients": sorted({record["client"] for record in records}), "results": results,
               # a method selected through its stage's grid: the setting its "lr" is
               "rate_of": {m: f"{method_spec(m).stage.name}.training.{method_spec(m).stage.grid_field}"
                           for m in chosen if selected_through_stage(config, m)},
               "chosen": {m: {str(b): s for b, s in by_budget.items()} for m, by_budget in chosen.items()
                          if selects_lr(config, m)}}
    tmp = run_dir / "selection.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, run_dir / "selection.json")


def read_chosen_scales(path: Path, methods: list[str], budgets: list[int]) -> dict[str, dict[int, float]]:
    """The learning-rate scale a run's ``selection.json`` chose per method and budget (1 for a method that learns
    its own learning rates, unless the run chose its stage's grid point); a method or budget it chose nothing for
    is an error naming them."""
    if not path.is_file():
        raise FedP2EFTError(f"{path} does not exist; give the selection.json of a finished run")
    chosen = json.loads(path.read_text())["chosen"]
    scales = {}
    for method in methods:
        if method_spec(method).lr_field is None and method not in chosen:
            scales[method] = dict.fromkeys(budgets, 1.0)
            continue
        missing = [b for b in budgets if str(b) not in chosen.get(method, {})]
        if missing:
            made = "; ".join(f"{m} at {sorted(map(int, by_budget))}" for m, by_budget in chosen.items()) or "none"
            raise FedP2EFTError(f"{path} chose no learning rate for {method} at budget(s) {missing} (its choices: "
                                f"{made})")
        scales[method] = {b: float(chosen[method][str(b)]) for b in budgets}
    return scales


def reused_scales(config: dict, path: Path, run_dir: Path) -> dict[str, dict[int, float]]:
    """The learning-rate scales another run chose (its ``selection.json``), for this run's methods and budgets;
    that file is copied here, with where it came from, so the report shows the choice."""
    try:
        scales = read_chosen_scales(path, selected_methods(config), config["budgets"])
    except FedP2EFTError as error:
        raise FedP2EFTError(f"selection.reuse: {error}; reuse a run with the same methods and budgets") from None
    tmp = run_dir / "selection.json.tmp"
    tmp.write_text(json.dumps({**json.loads(path.read_text()), "reused_from": str(path)}, indent=1))
    os.replace(tmp, run_dir / "selection.json")
    return scales


def stage_lr_scale(config: dict, stage: Stage, chosen: dict[str, dict[int, float]]) -> float:
    """The learning-rate scale a stage's local training runs at: ``<stage>.lr_scale`` is a number, or the name
    of a method whose selected scale it takes (the one chosen for most budgets, ties to the smaller; the PS
    generator's stage 1 is BayesTune, so ``btlora`` is the natural choice there)."""
    setting = config[stage.name]["lr_scale"]
    if not isinstance(setting, str):
        return float(setting)
    votes = Counter(chosen[setting].values())
    return min(votes, key=lambda scale: (-votes[scale], scale))


def stage_budget_lr_scales(config: dict, stage: Stage, chosen: dict[str, dict[int, float]]) -> dict:
    """What a stage that ``takes_budget_lr_scales`` gets when its ``lr_scale`` names a method whose scale was chosen
    per budget: each budget's scale over the stage's (``stage_lr_scale``), under ``budget_lr_scales``; nothing when
    every budget has the stage's scale (its settings stay as before this existed, so its runs resume)."""
    setting = config[stage.name]["lr_scale"]
    if not stage.takes_budget_lr_scales or not isinstance(setting, str):
        return {}
    scale = stage_lr_scale(config, stage, chosen)
    factors = {str(budget): chosen[setting][budget] / scale for budget in config["budgets"]}
    return {"budget_lr_scales": factors} if any(factor != 1.0 for factor in factors.values()) else {}


def stage_rates_of_run(config: dict, run_dir: Path, stage: Stage) -> tuple[float, dict]:
    """The learning-rate scale a finished run's ``stage`` trained at (``stage_lr_scale`` of its ``selection.json``)
    and the ``personalize`` mapping it was given (``settings_for_stage``)."""
    chosen = read_chosen_scales(run_dir / "selection.json", selected_methods(config), config["budgets"])
    scale = stage_lr_scale(config, stage, chosen)
    return scale, settings_for_stage(config["personalize"], stage, scale)
