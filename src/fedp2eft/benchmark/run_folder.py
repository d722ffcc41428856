"""A run's folder and its saved config: what a run was made with, which of its stages have finished, its JSONL
records and its stage times. Files are written atomically, so a killed run resumes (``runner.py`` lists the
folder's layout)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import yaml
from torch import nn

from fedp2eft.benchmark.config import OPTIONAL_KEYS, with_stage_sections
from fedp2eft.core.methods import Stage, grid_point_folders
from fedp2eft.errors import FedP2EFTError
from fedp2eft.experiment import Setup
from fedp2eft.interrupt import resumable

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


def read_saved(path: Path) -> dict:
    """A run's saved ``config.yaml`` as this version reads it: a key or a method's stage added after the run was
    made counts as its default there (OPTIONAL_KEYS, STAGES)."""
    return with_stage_sections(yaml.safe_load(path.read_text()) or {})


def check_run_folder(run_dir: Path, config: dict) -> None:
    """Refuse a run folder whose saved config differs from ``config`` in anything that shapes the results, so a
    changed config never silently reuses stages computed with another one."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    previous = read_saved(saved)
    changed = sorted(key for key in set(previous) | set(config)
                     if key not in RUNTIME_KEYS and previous.get(key) != config.get(key))
    if changed:
        raise FedP2EFTError(
            f"{run_dir} holds a run made with another config (differs in: {', '.join(changed)}); its finished "
            f"stages would not match. Give this run another name (name=...) or delete {run_dir}"
        )


def saved_config(run_dir: Path) -> dict:
    """The config a run folder was made with (its ``config.yaml``; keys added since count as their default)."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise FedP2EFTError(f"{run_dir} is not a benchmark run folder (no config.yaml); give the folder "
                            "`fedp2eft benchmark` wrote, e.g. results/default")
    return read_saved(saved)


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


def finished_artifact(config: dict, run_dir: Path, stage: Stage, seed: int) -> Path | None:
    """The artifact of ``stage`` a run uses for ``seed`` when there is one: the configured file or the one its
    stage exported (recorded in ``seed<s>/<stage>/export.json``); for a stage trained once per grid point, its folder
    as soon as one point has finished (``stage_points`` says which the run needs); None before that."""
    if config[stage.name]["artifact"]:
        return Path(config[stage.name]["artifact"])
    folder = stage_folder(run_dir, stage, seed)
    if grid_trained(config, stage):
        return folder if any(map(exported, grid_point_folders(folder).values())) else None
    return exported(folder)


def stage_folder(run_dir: Path, stage: Stage, seed: int) -> Path:
    return run_dir / f"seed{seed}" / stage.name


def exported(folder: Path) -> Path | None:
    """The artifact a finished federated job in ``folder`` exported (its ``export.json``), None before."""
    record = folder / "export.json"
    return Path(json.loads(record.read_text())["artifact"]) if record.exists() else None


def grid_trained(config: dict, stage: Stage) -> bool:
    """Whether ``stage`` is trained once per grid point of its ``grid_field`` in this run (``select_on_grid``, no
    configured artifact)."""
    section = config[stage.name]
    return stage.grid_field is not None and bool(section.get("select_on_grid")) and not section["artifact"]


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


def finished_run_model(run_dir: Path, device: str = "cpu") -> tuple[dict, Setup, nn.Module]:
    """A finished run's saved config, its ``Setup`` on the run's own base model, and that model: where a probe of
    a run (docs/experiments/) starts."""
    config = saved_config(run_dir)
    base_path = finished_base(config, run_dir)
    if base_path is None:
        raise FedP2EFTError(f"{run_dir} has no finished base model")
    setup = Setup.from_config({**config, "model": base_path})
    return config, setup, setup.load_base_model(device)
