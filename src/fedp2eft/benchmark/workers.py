"""The run's worker processes: each loads the base model once and the stages' artifacts on first use, and runs the
per-client jobs (``cells.py``) that the stages submit."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedp2eft.benchmark.run_folder import task_config
from fedp2eft.core.methods import personalize_config, stage_named
from fedp2eft.experiment import Setup
from fedp2eft.interrupt import children_start_deaf, ignore_interrupts
from fedp2eft.logs import console, quiet_third_party

# --- worker processes: one base model each, stage artifacts loaded on first use -----------------------------------
_WORKER: dict = {}


def _init_worker(config: dict, base_model: str) -> None:
    ignore_interrupts()  # the main process stops the workers on Ctrl-C (interrupt.py)
    torch.set_num_threads(1)
    quiet_third_party()
    setup = Setup.from_config(task_config(config, base_model, {}))
    _WORKER.update(setup=setup, base=setup.load_base_model(config["device"]), artifacts={}, base_model=base_model,
                   config=personalize_config(config["personalize"]))


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


class WorkerPool:
    """The run's worker processes, started when a stage first needs one and kept from one per-client stage to the
    next (selection, personalization): each loads the base model once for them, not once per stage. A federated
    stage ``release``s them first: idle, a worker still holds its model, tokenizer and the heap its passes grew
    (1-3 GB each), next to Ray's actors that hold their own; with the workers kept through the generator's stage
    the main job's processes held 11.3 GiB together (``benchmarks/job_memory.py``), over the 8 GB the job must stay
    under. The next per-client stage starts them again (a few seconds, both at once)."""

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
        with children_start_deaf():  # a submit starts the processes (spawn: one per submit, up to ``size``)
            return self._executor.submit(function, self.config, *job)

    def release(self) -> None:
        """Stop the worker processes (their jobs are all done: ``run_jobs`` waits for them) and free their memory;
        the next ``submit`` starts new ones."""
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

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
