"""The protocol, stage by stage. Each stage writes its output atomically and is skipped when already done, so a
killed run resumes where it stopped; a run folder made with another config is refused (``check_run_folder``):

    base/model/                       base model (FedAvg on the seen pool, first seed), a normal HF checkpoint
    selection.jsonl                   validation scores of every method x budget x learning-rate scale
    seed<s>/<stage>/                  artifact of each method's federated stage per seed (Flower, seen pool
                                      only), e.g. seed0/psg/generator.safetensors
    personalize.jsonl                 one row per (seed, pool, client): every method x budget evaluated
    report.md ...                     tables and figures (``report/``)

The learning rate of every method and budget is chosen on a validation split of some clients' *training* data
(by default clients the base model and generator never saw) with the same grid for every method
(docs/method.md, "Benchmark regime"); test data are never looked at.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from fedp2eft.benchmark.cells import personalize_client
from fedp2eft.benchmark.config import stage_min_clients
from fedp2eft.benchmark.run_folder import StageClock, check_run_folder, exported, finished_base, read_jsonl, \
    saved_config, stage_folder, task_config
from fedp2eft.benchmark.lr_selection import chosen_scales, reused_scales, selected_methods, selects_lr, \
    stage_budget_lr_scales, stage_grid_rate, stage_lr_scale, stage_points, stage_select, write_selection
from fedp2eft.benchmark.workers import WorkerPool, run_jobs
from fedp2eft.core.methods import Stage, grid_point_folder, method_spec, settings_for_stage, stages
from fedp2eft.errors import FedP2EFTError
from fedp2eft.experiment import Setup
from fedp2eft.fl.checkpoint import load_state
from fedp2eft.fl.simulation import run_federated
from fedp2eft.fl.tasks import build_task, export_final
from fedp2eft.logs import console
from fedp2eft.models.registry import resolve_model

def federated(name: str, config: dict, section: dict, model: str, training: dict, output: Path,
              seed: int) -> Path:
    """Run (or resume) one Flower job and export its artifact (base checkpoint, generator file, ...)."""
    output.mkdir(parents=True, exist_ok=True)
    state = load_state(output)
    job = task_config(config, model, training)
    task = build_task(name, job)  # once for the server's side and the export
    if state is None or state.round < section["rounds"]:
        run_federated(name, job, section["rounds"], section["clients_per_round"], output_dir=output, seed=seed,
                      resume=state is not None, min_clients=stage_min_clients(section["clients_per_round"]),
                      dp=section["privacy"]["dp"], secagg=section["privacy"]["secagg"], task=task)
    return export_final(name, job, output, task)


def stage_base(config: dict, run_dir: Path) -> str:
    """Path of the base model: the configured checkpoint, or one trained with FedAvg on the seen pool. One base
    model serves every seed: it is the common starting point of all methods (docs/method.md)."""
    section = config["base"]
    finished = finished_base(config, run_dir)
    if finished is not None:
        return finished
    algorithm = section["algorithm"]
    console.rule(f"[bold]Stage 1/5: base model ({'FedAvg' if algorithm == 'fedavg' else algorithm} on the seen pool)")
    training = {**section["training"], "seed": config["seeds"][0]}
    if algorithm != "fedavg":  # FedAvg's task config stays as before the algorithm existed, so its runs resume
        training |= {**section[algorithm], "algorithm": algorithm}
    return str(federated("base", config, section, config["model"], training, run_dir / "base",
                         config["seeds"][0]))


def stage_artifact(config: dict, run_dir: Path, base_model: str, stage: Stage, seed: int, lr_scale: float,
                   pool: WorkerPool | None = None, points: list[float] | None = None,
                   changed: dict | None = None) -> Path:
    """The artifact of one method stage (e.g. the PS generator) for one seed: the configured file, or one trained
    on the seen pool, with the run's worker processes (``pool``) released meanwhile, so that their memory goes to
    Flower's clients. Its local training runs at the personalization rates x ``lr_scale``, its ``training`` settings
    updated with ``changed``. With grid ``points`` (``stage_points``) it is trained once per point, its
    ``grid_field`` times the point, each in its own folder (``grid_point_folder``), and the stage's folder holding
    them is its artifact."""
    if config[stage.name]["artifact"]:
        return Path(config[stage.name]["artifact"])
    folder, changed = stage_folder(run_dir, stage, seed), changed or {}
    if points is None:
        return _train_stage(config, folder, base_model, stage, seed, lr_scale, pool, changed)
    rate = stage_grid_rate(config, stage)
    for point in points:
        _train_stage(config, grid_point_folder(folder, point), base_model, stage, seed, lr_scale, pool,
                     {**changed, stage.grid_field: rate * point}, f", {stage.grid_field} x{point:g}")
    return folder


def _train_stage(config: dict, output: Path, base_model: str, stage: Stage, seed: int, lr_scale: float,
                 pool: WorkerPool | None, changed: dict, title: str = "") -> Path:
    """One federated job of ``stage`` into ``output`` (skipped when it has exported), its ``training`` settings
    updated with ``changed``."""
    finished = exported(output)
    if finished is not None:
        return finished
    if pool is not None:
        pool.release()
    section = config[stage.name]
    console.rule(f"[bold]Stage 3/5: {stage.name}, seed {seed}{title} (Flower, seen pool)")
    training = {**section["training"], **changed,
                "personalize": settings_for_stage(config["personalize"], stage, lr_scale), "seed": seed}
    if stage.counts_rounds:
        training["total_rounds"] = section["rounds"]
    artifact = federated(stage.name, config, section, base_model, training, output, seed)
    tmp = output / "export.json.tmp"
    tmp.write_text(json.dumps({"artifact": str(artifact)}))
    os.replace(tmp, output / "export.json")
    return artifact


def stage_personalize(config: dict, run_dir: Path, pool: WorkerPool, artifacts: dict[int, dict[str, Path]],
                      scales: dict[str, dict[int, float]]) -> list[dict]:
    results_file = run_dir / "personalize.jsonl"
    done = read_jsonl(results_file)
    finished = {(r["seed"], r["pool"], r["client"]) for r in done}
    setup = Setup.from_config(task_config(config, pool.base_model, {}))
    jobs = [(seed, name, index, scales, {stage: str(path) for stage, path in artifacts[seed].items()})
            for seed in config["seeds"] for name in config["pools"]
            for index, client in enumerate(setup.data.pool(name)) if (seed, name, client.client_id) not in finished]
    if jobs:
        console.rule(f"[bold]Stage 4/5: personalize every client ({' and '.join(config['pools'])}), every seed")
    return done + run_jobs(pool, personalize_client, jobs, results_file, "clients")


def run(config: dict, results_root: Path = Path("results"), command: str = "") -> Path:
    """Run every stage not yet done for ``config``; returns the run folder. A list of base algorithms runs the
    whole protocol once per base, each in its own sub-folder, and reports them side by side."""
    from fedp2eft.benchmark.report import write_bases_report, write_report

    run_dir = results_root / config["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_folder(run_dir, config)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if isinstance(config["base"]["algorithm"], list):
        parts = {}
        for algorithm in config["base"]["algorithm"]:
            console.rule(f"[bold]Base {algorithm}")
            part = {**config, "name": algorithm, "base": {**config["base"], "algorithm": algorithm}}
            if algorithm != "fedavg":  # the first base (FedAvg) chose on unseen clients; the others reuse it
                part["selection"] = {**config["selection"], "reuse": str(parts["fedavg"] / "selection.json")}
            parts[algorithm] = run(part, run_dir, command)
        write_bases_report(config, run_dir, {name: read_jsonl(path / "personalize.jsonl")
                                             for name, path in parts.items()}, command)
        return run_dir
    clock = StageClock(run_dir / "timings.json")
    base_model = clock.time("base", stage_base, config, run_dir)
    reused = config["selection"].get("reuse")
    with WorkerPool(config, base_model) as pool:
        plain = [m for m in selected_methods(config) if method_spec(m).stage is None and selects_lr(config, m)]
        records = [] if reused else clock.time("select", stage_select, config, run_dir, pool, plain, {})
        scales = reused_scales(config, Path(reused), run_dir) if reused else chosen_scales(config, records)
        artifacts: dict[int, dict[str, Path]] = {seed: {} for seed in config["seeds"]}
        for stage in stages(config["methods"]):
            lr_scale, changed = stage_lr_scale(config, stage, scales), stage_budget_lr_scales(config, stage, scales)
            first, *others = config["seeds"]
            # the first seed's artifact (every grid point of a stage trained per point) serves selection; the
            # other seeds train only the points chosen
            artifacts[first][stage.name] = clock.time(stage.name, stage_artifact, config, run_dir, base_model, stage,
                                                      first, lr_scale, pool,
                                                      stage_points(config, stage, scales if reused else None), changed)
            if not reused:
                users = [m for m in config["methods"] if method_spec(m).stage is stage and selects_lr(config, m)]
                records = clock.time("select", stage_select, config, run_dir, pool, users,
                                     {stage.name: artifacts[first][stage.name]})
                scales = chosen_scales(config, records)
            for seed in others:
                artifacts[seed][stage.name] = clock.time(stage.name, stage_artifact, config, run_dir, base_model,
                                                         stage, seed, lr_scale, pool,
                                                         stage_points(config, stage, scales), changed)
        if not reused:
            write_selection(config, run_dir, records, scales)
        results = clock.time("personalize", stage_personalize, config, run_dir, pool, artifacts, scales)
    console.rule("[bold]Stage 5/5: report")
    write_report(config, run_dir, results, clock.seconds, command, base_model=resolve_model(base_model))
    return run_dir


def rewrite_report(run_dir: Path) -> Path:
    """Write a finished run's report again from its own files (``config.yaml``, ``personalize.jsonl``,
    ``timings.json``, the stages' logs) with this version's report: nothing is trained, the run's command is kept.
    Module shapes for the adapters' size come from the base checkpoint, or from the configured model when the
    checkpoint was deleted (training a base model changes its weights, not its shapes)."""
    from fedp2eft.benchmark.report import write_bases_report, write_report

    run_dir = Path(run_dir)
    config = saved_config(run_dir)
    previous = run_dir / "results.json"
    command = json.loads(previous.read_text()).get("command", "") if previous.is_file() else ""
    rewritten_by = f"fedp2eft report {run_dir}"
    if isinstance(config["base"]["algorithm"], list):
        write_bases_report(config, run_dir, {name: _finished_records(run_dir / name)
                                             for name in config["base"]["algorithm"]}, command, rewritten_by)
        for name in config["base"]["algorithm"]:
            rewrite_report(run_dir / name)
        return run_dir
    base_model = finished_base(config, run_dir) or config["model"]
    write_report(config, run_dir, _finished_records(run_dir), StageClock(run_dir / "timings.json").seconds, command,
                 base_model=resolve_model(base_model), rewritten_by=rewritten_by)
    return run_dir


def _finished_records(run_dir: Path) -> list[dict]:
    records = read_jsonl(run_dir / "personalize.jsonl")
    if not records:
        raise FedP2EFTError(f"{run_dir} has no personalized clients yet (personalize.jsonl is missing or empty); "
                            "finish the run with `fedp2eft benchmark` first")
    return records
