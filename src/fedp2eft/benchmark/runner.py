"""The protocol, stage by stage. Each stage writes its output atomically and is skipped when already done,
so a killed run resumes where it stopped:

    base/model/               base model (FedAvg on the seen pool), a normal HF checkpoint
    psg/generator.safetensors PS generator (Flower, seen pool only)
    personalize.jsonl         one row per (seed, pool, client): every method x budget evaluated
    report.md ...             tables and figures (``report.py``)
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedp2eft.core.generator import PSGenerator
from fedp2eft.core.generator_training import GENERATOR_FILE
from fedp2eft.core.methods import PersonalizeConfig, generator_spec, personalize
from fedp2eft.experiment import Setup
from fedp2eft.fl.checkpoint import load_state
from fedp2eft.fl.simulation import run_federated
from fedp2eft.fl.tasks import export_final
from fedp2eft.logs import quiet_third_party

console = Console()


def task_config(config: dict, model: str, training: dict) -> dict:
    return {"model": model, "dataset": config["dataset"], "dataset_options": config["dataset_options"],
            "max_length": config["max_length"], "training": training}


def federated(name: str, config: dict, section: dict, model: str, training: dict, output: Path) -> Path:
    """Run (or resume) one Flower job and export its artifact (base checkpoint or generator file)."""
    output.mkdir(parents=True, exist_ok=True)
    state = load_state(output)
    job = task_config(config, model, training)
    if state is None or state.server_round < section["rounds"]:
        run_federated(name, job, section["rounds"], section["clients_per_round"], output_dir=output,
                      seed=config["seeds"][0], resume=state is not None,
                      min_clients=max(1, section["clients_per_round"] // 2))
    return export_final(name, job, output)


def stage_base(config: dict, run_dir: Path) -> str:
    """Path of the base model: the configured checkpoint, or one trained with FedAvg on the seen pool."""
    section = config["base"]
    if section["checkpoint"]:
        return str(section["checkpoint"])
    final = run_dir / "base" / "model"
    if (final / "config.json").exists():
        return str(final)
    console.rule("[bold]Stage 1/4: base model (FedAvg on the seen pool)")
    training = {**section["training"], "seed": config["seeds"][0]}
    return str(federated("base", config, section, config["model"], training, run_dir / "base"))


def stage_generator(config: dict, run_dir: Path, base_model: str) -> Path | None:
    if "fedp2eft" not in config["methods"]:
        return None
    section = config["psg"]
    if section["generator"]:
        return Path(section["generator"])
    final = run_dir / "psg" / GENERATOR_FILE
    if final.exists():
        return final
    console.rule("[bold]Stage 2/4: PS generator (Flower, seen pool)")
    training = {**section["training"], "personalize": config["personalize"], "seed": config["seeds"][0]}
    return federated("psg", config, section, base_model, training, run_dir / "psg")


# --- personalization workers ---------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(config: dict, base_model: str, generator_path: str | None) -> None:
    torch.set_num_threads(1)
    quiet_third_party()
    setup = Setup.from_config(task_config(config, base_model, {}))
    base = setup.load_base_model()
    spec = generator_spec(base, PersonalizeConfig.from_dict(config["personalize"]), base_model)
    _WORKER.update(setup=setup, base=base,
                   generator=PSGenerator.load(generator_path, expected=spec) if generator_path else None)


def personalize_client(config: dict, seed: int, pool: str, index: int) -> dict:
    """Every method x budget for one client (in a worker process). Also the un-personalized base model."""
    setup, base, generator = _WORKER["setup"], _WORKER["base"], _WORKER["generator"]
    client = setup.data.pool(pool)[index]
    personal = PersonalizeConfig.from_dict({**config["personalize"], "seed": seed})
    rows = [{"method": "base", "budget": 0, **_scores(setup.task.evaluate(base, client.test)), "seconds": 0.0}]
    for method in config["methods"]:
        for budget in config["budgets"]:
            start = time.perf_counter()
            result = personalize(method, base, setup.task, client.train, budget, personal, generator)
            scores = _scores(setup.task.evaluate(result.model, client.test))
            row = {"method": method, "budget": budget, **scores, "seconds": time.perf_counter() - start,
                   "train_loss_last_epoch": result.metrics["train_loss_last_epoch"]}
            if method in ("fedp2eft", "btlora"):
                row["ranks"] = result.ranks
            rows.append(row)
    return {"seed": seed, "pool": pool, "client": client.client_id, "language": client.language, "rows": rows}


def _scores(metrics: dict) -> dict:
    return {"correct": metrics["correct"], "count": metrics["count"],
            "score": metrics["correct"] / metrics["count"]}


def stage_personalize(config: dict, run_dir: Path, base_model: str, generator: Path | None) -> list[dict]:
    console.rule("[bold]Stage 3/4: personalize every client (seen and unseen)")
    results_file = run_dir / "personalize.jsonl"
    done = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    finished = {(r["seed"], r["pool"], r["client"]) for r in done}
    setup = Setup.from_config(task_config(config, base_model, {}))
    jobs = [(seed, pool, index) for seed in config["seeds"] for pool in config["pools"]
            for index, client in enumerate(setup.data.pool(pool)) if (seed, pool, client.client_id) not in finished]
    if not jobs:  # resumed after this stage finished: no worker needs to load the model
        return done
    workers = max(1, min(int(config["workers"]), os.cpu_count() or 1, len(jobs)))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress, results_file.open("a") as sink, ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_init_worker,
        initargs=(config, base_model, str(generator) if generator else None),
    ) as pool_executor:
        bar = progress.add_task("clients", total=len(jobs))
        futures = [pool_executor.submit(personalize_client, config, *job) for job in jobs]
        for future in as_completed(futures):
            record = future.result()
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            done.append(record)
            progress.advance(bar)
    return done


class StageClock:
    """Seconds spent per stage, added up over every invocation of a run (so a resumed run reports its true
    total); kept in ``timings.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def time(self, stage: str, function, *args):
        start = time.perf_counter()
        try:
            return function(*args)
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.seconds, indent=1))
            os.replace(tmp, self.path)


def run(config: dict, results_root: Path = Path("results"), command: str = "") -> Path:
    """Run every stage not yet done for ``config``; returns the run folder."""
    from fedp2eft.benchmark.report import write_report

    run_dir = results_root / config["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.yaml"
    if saved.exists() and yaml.safe_load(saved.read_text()) != config:
        console.print(f"[yellow]{saved} differs from this config; stages already done are kept. "
                      f"Use another name= to start afresh.")
    saved.write_text(yaml.safe_dump(config, sort_keys=False))
    clock = StageClock(run_dir / "timings.json")
    base_model = clock.time("base", stage_base, config, run_dir)
    generator = clock.time("psg", stage_generator, config, run_dir, base_model)
    records = clock.time("personalize", stage_personalize, config, run_dir, base_model, generator)
    console.rule("[bold]Stage 4/4: report")
    write_report(config, run_dir, records, generator, base_model, clock.seconds, command)
    return run_dir
