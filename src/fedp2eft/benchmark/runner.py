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
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedp2eft.benchmark.config import OPTIONAL_KEYS, stage_min_clients, with_optional_keys
from fedp2eft.core.methods import ClientContext, PersonalizeConfig, Personalized, Stage, evaluate_many, method_lr, \
    method_spec, personalize, personalize_many, stage_named, stages
from fedp2eft.core.personalization import validation_split
from fedp2eft.core.pfl import apply_overlay
from fedp2eft.errors import FedP2EFTError
from fedp2eft.experiment import Setup
from fedp2eft.fl.checkpoint import load_state
from fedp2eft.fl.simulation import run_federated
from fedp2eft.fl.tasks import build_task, export_final
from fedp2eft.interrupt import ignore_interrupts, resumable
from fedp2eft.logs import console, quiet_third_party
from fedp2eft.models.registry import resolve_model

log = logging.getLogger(__name__)
# Keys that change how fast a run goes, never what it computes: they may differ when a run is resumed.
RUNTIME_KEYS = ("workers", "device", "report")


def task_config(config: dict, model: str, training: dict) -> dict:
    """What a federated stage's clients and the benchmark's workers build their setup from. Optional keys appear
    only when they differ from their default, so stages checkpointed before a key existed still resume."""
    job = {"model": model, "dataset": config["dataset"], "dataset_options": config["dataset_options"],
           "max_length": config["max_length"], "budgets": config["budgets"], "device": config["device"],
           "training": training}
    return job | {key: config[key] for key, default in OPTIONAL_KEYS.items() if config.get(key, default) != default}


def check_run_folder(run_dir: Path, config: dict) -> None:
    """Refuse a run folder whose saved config differs from ``config`` in anything that shapes the results, so a
    changed config never silently reuses stages computed with another one."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    # a key added to the config after the run was made counts as its default there (see OPTIONAL_KEYS)
    previous = with_optional_keys(yaml.safe_load(saved.read_text()) or {})
    changed = sorted(key for key in set(previous) | set(config)
                     if key not in RUNTIME_KEYS and previous.get(key) != config.get(key))
    if changed:
        raise FedP2EFTError(
            f"{run_dir} holds a run made with another config (differs in: {', '.join(changed)}); its finished "
            f"stages would not match. Give this run another name (name=...) or delete {run_dir}"
        )


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


def saved_config(run_dir: Path) -> dict:
    """The config a run folder was made with (its ``config.yaml``; keys added since count as their default)."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise FedP2EFTError(f"{run_dir} is not a benchmark run folder (no config.yaml); give the folder "
                            "`fedp2eft benchmark` wrote, e.g. results/default")
    return with_optional_keys(yaml.safe_load(saved.read_text()) or {})


def run_config(run_dir: Path) -> dict:
    """``saved_config`` of a run over one base model, for commands that rebuild one of its cells."""
    config = saved_config(run_dir)
    algorithms = config["base"]["algorithm"]
    if isinstance(algorithms, list):
        raise FedP2EFTError(f"{run_dir} holds one run per base model ({', '.join(algorithms)}); give one of them, "
                            f"e.g. {Path(run_dir) / algorithms[0]}")
    return config


def finished_base(config: dict, run_dir: Path) -> str | None:
    """Path of the run's base model when there is one: the configured checkpoint or the one its base stage
    exported; None before the base stage has finished."""
    if config["base"]["checkpoint"]:
        return str(config["base"]["checkpoint"])
    final = run_dir / "base" / "model"
    return str(final) if (final / "config.json").exists() else None


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


def finished_artifact(config: dict, run_dir: Path, stage: Stage, seed: int) -> Path | None:
    """The artifact of ``stage`` a run uses for ``seed`` when there is one: the configured file or the one its
    stage exported (recorded in ``seed<s>/<stage>/export.json``); None before that stage has finished."""
    if config[stage.name]["artifact"]:
        return Path(config[stage.name]["artifact"])
    record = run_dir / f"seed{seed}" / stage.name / "export.json"
    return Path(json.loads(record.read_text())["artifact"]) if record.exists() else None


def stage_artifact(config: dict, run_dir: Path, base_model: str, stage: Stage, seed: int, lr_scale: float) -> Path:
    """The artifact of one method stage (e.g. the PS generator) for one seed: the configured file, or one trained
    on the seen pool. Its local training runs at the personalization rates x ``lr_scale``."""
    section = config[stage.name]
    finished = finished_artifact(config, run_dir, stage, seed)
    if finished is not None:
        return finished
    output = run_dir / f"seed{seed}" / stage.name
    console.rule(f"[bold]Stage 3/5: {stage.name}, seed {seed} (Flower, seen pool)")
    personal = PersonalizeConfig.from_dict(config["personalize"]).with_lr_scale(lr_scale)
    rates = {"lora_lr": personal.lora_lr, "scale_lr": personal.scale_lr, "adalora_lr": personal.adalora_lr}
    training = {**section["training"], "personalize": {**config["personalize"], **rates}, "seed": seed}
    if stage.counts_rounds:
        training["total_rounds"] = section["rounds"]
    artifact = federated(stage.name, config, section, base_model, training, output, seed)
    tmp = output / "export.json.tmp"
    tmp.write_text(json.dumps({"artifact": str(artifact)}))
    os.replace(tmp, output / "export.json")
    return artifact


# --- worker processes: one base model each, stage artifacts loaded on first use -----------------------------------
_WORKER: dict = {}


def _init_worker(config: dict, base_model: str) -> None:
    ignore_interrupts()  # the main process stops the workers on Ctrl-C (interrupt.py)
    torch.set_num_threads(1)
    quiet_third_party()
    setup = Setup.from_config(task_config(config, base_model, {}))
    _WORKER.update(setup=setup, base=setup.load_base_model(config["device"]), artifacts={}, base_model=base_model,
                   config=PersonalizeConfig.from_dict(config["personalize"]))


def worker_model() -> tuple[Setup, torch.nn.Module]:
    """This worker's setup (data, task) and base model, for a job function submitted to a ``WorkerPool``."""
    return _WORKER["setup"], _WORKER["base"]


def worker_artifacts(paths: dict[str, str]) -> dict[str, object]:
    """The stage artifacts at ``paths`` (stage name -> path), each loaded once per worker and checked against the
    base model by its stage."""
    for name, path in paths.items():
        if path not in _WORKER["artifacts"]:
            _WORKER["artifacts"][path] = stage_named(name).load(Path(path), _WORKER["base"], _WORKER["config"],
                                                    _WORKER["base_model"])
    return {name: _WORKER["artifacts"][path] for name, path in paths.items()}


def _scores(metrics: dict) -> dict:
    """The task's main metric as (correct, count), what selection and the report pool over clients (a sum of
    ROUGE-L scores for generations, so not always an integer), and every metric as [sum, count] under ``scores``."""
    scores = metrics["scores"]
    main, (total, count) = next(iter(scores.items()))
    return {"metric": main, "correct": total, "count": count, "score": total / count,
            "scores": {name: list(pair) for name, pair in scores.items()}}


def validate_client(config: dict, index: int, methods: list[str], artifacts: dict[str, str]) -> dict:
    """Every method x budget x learning-rate scale of the grid, trained on the inner split of one client's
    training data and scored on its validation split (that client's test data are never touched)."""
    setup, base = worker_model()
    section = config["selection"]
    client = setup.data.pool(section["pool"])[index]
    inner, held_out = validation_split(client.train, section["validation_fraction"], client.client_id)
    context = ClientContext(base, setup.task, inner, worker_artifacts(artifacts))
    personal = seeded_personalize_config(config, config["seeds"][0])
    grid = [(method, scale, budget) for method in methods for scale in section["grid"] for budget in config["budgets"]]
    with apply_overlay(base, setup.personal_overlay(base, section["pool"], index)):
        results = personalize_many(context, [(m, b, personal.with_lr_scale(s)) for m, s, b in grid])
        scores = evaluate_many(setup.task, results, held_out)
    rows = [{"method": method, "budget": budget, "scale": scale, **_scores(score)}
            for (method, scale, budget), score in zip(grid, scores)]
    return {"client": client.client_id, "language": client.language, "methods": methods, "rows": rows}


def personalize_client(config: dict, seed: int, pool: str, index: int, scales: dict[str, dict[int, float]],
                       artifacts: dict[str, str]) -> dict:
    """Every method x budget for one client (in a worker process), each at its selected learning-rate scale;
    also the un-personalized base model. The client's features, generator output and BayesTune search are
    computed once for all budgets. Rows carry what each method declares it reports (ranks, lambdas, ...). On a
    personalized-FL base everything, the base row included, starts from the client's own personal base."""
    setup, base = worker_model()
    client = setup.data.pool(pool)[index]
    personal = seeded_personalize_config(config, seed)
    context = ClientContext(base, setup.task, client.train, worker_artifacts(artifacts))
    cells = [(method, budget, scales[method][budget]) for method in config["methods"] for budget in config["budgets"]]
    with apply_overlay(base, setup.personal_overlay(base, pool, index)):
        start = time.perf_counter()
        rows = [{"method": "base", "budget": 0, **_scores(setup.task.evaluate(base, client.test)),
                 "seconds": time.perf_counter() - start}]
        start = time.perf_counter()
        results = personalize_many(context, [(m, b, personal.with_lr_scale(s)) for m, b, s in cells])
        scores = evaluate_many(setup.task, results, client.test)
        seconds = (time.perf_counter() - start) / len(cells)  # cells trained together share their pass's time
    rows += [cell_row(method, budget, personal.with_lr_scale(scale), scale, result, score, seconds)
             for (method, budget, scale), result, score in zip(cells, results, scores)]
    return {"seed": seed, "pool": pool, "client": client.client_id, "language": client.language, "rows": rows}


def seeded_personalize_config(config: dict, seed: int) -> PersonalizeConfig:
    """The personalization settings of a run's ``seed`` (before its learning-rate scale is applied)."""
    return PersonalizeConfig.from_dict({**config["personalize"], "seed": seed})


def personalize_cell(context: ClientContext, test: list[dict], method: str, budget: int, personal: PersonalizeConfig,
                     lr_scale: float) -> tuple[dict, Personalized]:
    """One cell of the results for one client: ``method`` at ``budget`` with every learning rate times
    ``lr_scale``, scored on the client's test data. Returns the row ``personalize.jsonl`` keeps (with what the method
    reports) and the personalized model; the benchmark and ``fedp2eft personalize --run`` both compute cells here,
    so the command reproduces the run's rows."""
    start = time.perf_counter()
    tuned = personal.with_lr_scale(lr_scale)
    result = personalize(method, context, budget=budget, config=tuned)
    score = context.task.evaluate(result.model, test)
    return cell_row(method, budget, tuned, lr_scale, result, score, time.perf_counter() - start), result


def cell_row(method: str, budget: int, tuned: PersonalizeConfig, lr_scale: float, result: Personalized, score: dict,
             seconds: float) -> dict:
    """The row ``personalize.jsonl`` keeps for one cell, with what its method declares it reports."""
    row = {"method": method, "budget": budget, **_scores(score), "seconds": seconds, "lr_scale": lr_scale,
           "lr": method_lr(tuned, method, budget), "train_loss_last_epoch": result.metrics["train_loss_last_epoch"]}
    for field in method_spec(method).reports:
        row[field] = result.ranks if field == "ranks" else result.report[field]
    return row


class WorkerPool:
    """The run's worker processes, started when a stage first needs one and kept for every later stage: each loads
    the base model once per run instead of once per stage (seconds each time; the quick profile has four such
    stages). Workers stay idle, holding their model, while a federated stage runs."""

    def __init__(self, config: dict, base_model: str) -> None:
        self.config, self.base_model = config, base_model
        self._executor: ProcessPoolExecutor | None = None

    def submit(self, function: Callable, *job) -> Future:
        """``function(config, *job)`` in a worker; processes are started on demand, up to ``workers`` and the core
        count."""
        if self._executor is None:
            size = max(1, min(int(self.config["workers"]), os.cpu_count() or 1))
            self._executor = ProcessPoolExecutor(size, mp_context=get_context("spawn"), initializer=_init_worker,
                                                 initargs=(self.config, self.base_model))
        return self._executor.submit(function, self.config, *job)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exception) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)


def run_jobs(pool: WorkerPool, function: Callable, jobs: list[tuple], sink: Path, label: str) -> list[dict]:
    """``function(config, *job)`` for every job in the run's worker processes; each record is appended to the
    JSONL file ``sink`` as soon as it is done, so a killed run keeps its finished work."""
    if not jobs:
        return []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    records = []
    with Progress(*columns, console=console) as progress, sink.open("a") as out:
        bar = progress.add_task(label, total=len(jobs))
        futures = [pool.submit(function, *job) for job in jobs]
        for future in as_completed(futures):
            record = future.result()
            out.write(json.dumps(record) + "\n")
            out.flush()
            records.append(record)
            progress.advance(bar)
    return records


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSONL file; a last line cut by a hard kill is dropped (its work is redone)."""
    if not path.exists():
        return []
    records, lines = [], path.read_text().splitlines()
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise FedP2EFTError(f"{path} line {number + 1} is corrupt; delete the file to redo its stage")
            log.warning(f"{path}: dropped its last line, cut off when the run was killed; that work is redone")
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return records


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


def chosen_scales(config: dict, records: list[dict]) -> dict[str, dict[int, float]]:
    """Per method, the grid scale with the best pooled validation accuracy (ties: the smaller scale): per budget
    with ``selection.per_budget``, else one scale for all budgets, chosen on the validation rows of every budget
    pooled (four times the data per decision at four budgets; docs/method.md, "Benchmark regime"). With a
    one-point grid that point. A method that learns its own learning rates keeps scale 1."""
    grid = config["selection"]["grid"]
    correct, count = validation_counts(records)

    def best(method: str, budgets: list[int]) -> float:
        totals = [(sum(correct[(method, b, s)] for b in budgets), sum(count[(method, b, s)] for b in budgets), -i, s)
                  for i, s in enumerate(grid)]
        scored = [(right / seen, order, scale) for right, seen, order, scale in totals if seen]
        return max(scored)[2] if scored else grid[0]

    chosen: dict[str, dict[int, float]] = {}
    for method in selected_methods(config):
        if method_spec(method).lr_field is None:
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
    personal = PersonalizeConfig.from_dict(config["personalize"])
    results = [{"method": m, "budget": b, "scale": s,
                "lr": method_lr(personal.with_lr_scale(s), m, b),
                "val_accuracy": correct[(m, b, s)] / count[(m, b, s)], "val_count": count[(m, b, s)]}
               for (m, b, s) in sorted(count)]
    metric = next((row.get("metric", "accuracy") for record in records for row in record["rows"]), "accuracy")
    payload = {"metric": metric, "grid": config["selection"]["grid"],
               "validation_fraction": config["selection"]["validation_fraction"],
               "pool": config["selection"]["pool"], "per_budget": config["selection"]["per_budget"],
               "clients": sorted({record["client"] for record in records}), "results": results,
               "chosen": {m: {str(b): s for b, s in by_budget.items()} for m, by_budget in chosen.items()
                          if method_spec(m).lr_field is not None}}
    tmp = run_dir / "selection.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, run_dir / "selection.json")


def read_chosen_scales(path: Path, methods: list[str], budgets: list[int]) -> dict[str, dict[int, float]]:
    """The learning-rate scale a run's ``selection.json`` chose per method and budget (1 for a method that learns
    its own learning rates); a method or budget it chose nothing for is an error naming them."""
    if not path.is_file():
        raise FedP2EFTError(f"{path} does not exist; give the selection.json of a finished run")
    chosen = json.loads(path.read_text())["chosen"]
    scales = {}
    for method in methods:
        if method_spec(method).lr_field is None:
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


class StageClock:
    """Seconds spent per stage, added up over every invocation of a run (so a resumed run reports its true
    total); kept in ``timings.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def time(self, stage: str, function, *args):
        start = time.perf_counter()
        try:
            with resumable(f"the {stage} stage", "the same command resumes the run there (finished stages, rounds "
                                                 "and clients are kept)"):
                return function(*args)
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.seconds, indent=1))
            os.replace(tmp, self.path)


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
        plain = [m for m in selected_methods(config)
                 if method_spec(m).stage is None and method_spec(m).lr_field is not None]
        records = [] if reused else clock.time("select", stage_select, config, run_dir, pool, plain, {})
        scales = reused_scales(config, Path(reused), run_dir) if reused else chosen_scales(config, records)
        artifacts: dict[int, dict[str, Path]] = {seed: {} for seed in config["seeds"]}
        for stage in stages(config["methods"]):
            lr_scale = stage_lr_scale(config, stage, scales)
            for seed in config["seeds"]:
                artifacts[seed][stage.name] = clock.time(stage.name, stage_artifact, config, run_dir, base_model,
                                                         stage, seed, lr_scale)
            if reused:
                continue
            users = [m for m in config["methods"]
                     if method_spec(m).stage is stage and method_spec(m).lr_field is not None]
            records = clock.time("select", stage_select, config, run_dir, pool, users,
                                 {stage.name: artifacts[config["seeds"][0]][stage.name]})
            scales = chosen_scales(config, records)
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
