"""Resolve a task name to a ``FederatedTask``: a name some installed package declares, or any
``package.module:function`` factory.

The Flower layer knows no task but its own toy: a package names its federated tasks under the ``fedp2eft.tasks``
entry-point group (a function returning a ``name -> make_task(config)`` mapping; this package declares its own in
pyproject.toml), so that a task name in a job reaches every process that runs it, simulation actors and
SuperNodes alike. Imports happen lazily so that the Flower layer never pulls a model library it does not need.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from fedp2eft.core.federation import FederatedTask
from fedp2eft.errors import FedP2EFTError

TASK_GROUP = "fedp2eft.tasks"
TOY_TASK = "fedp2eft.fl.toy_task:make_task"

_REQUIRED_METHODS = ("initial_weights", "num_clients", "client_update")

TaskFactory = Callable[[dict[str, Any]], FederatedTask]


def named_tasks() -> dict[str, TaskFactory]:
    """Every task name the installed packages declare (``fedp2eft.tasks`` entry points), plus ``toy``."""
    tasks: dict[str, TaskFactory] = {"toy": _load(TOY_TASK, "toy")}
    for entry in entry_points(group=TASK_GROUP):
        tasks |= entry.load()()
    return tasks


def resolve_factory(name_or_path: str) -> TaskFactory:
    """Return the ``make_task(config)`` callable behind a declared name or a dotted path."""
    if ":" in name_or_path:
        return _load(name_or_path, name_or_path)
    tasks = named_tasks()
    if name_or_path not in tasks:
        raise FedP2EFTError(f"unknown task {name_or_path!r}: use one of {sorted(tasks)} or a factory path like "
                            "'package.module:make_task'")
    return tasks[name_or_path]


def _load(target: str, name: str) -> TaskFactory:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise FedP2EFTError(f"task {name!r}: a factory path looks like 'package.module:make_task'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise FedP2EFTError(f"cannot import task module {module_name!r} for task {name!r}: {error}") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise FedP2EFTError(f"task factory {target!r} does not exist or is not callable")
    return factory


def export_final(name_or_path: str, config: dict[str, Any], output_dir: Path,
                 task: FederatedTask | None = None) -> Path:
    """Turn a finished run into the task's artifact (``ExportableTask.export``): the best weights kept for a task
    that names a ``best_metric`` (early stopping), else the last checkpoint; tasks without ``export`` keep the
    weights checkpoint as their result. A stateful task's artifact also notes where its clients keep their states
    and from which round (the simulation's client folder). ``task``: the task already built from this config, if
    the caller holds one (building it again loads the model again)."""
    from fedp2eft.fl.checkpoint import load_best, load_state, load_weights

    state = load_state(output_dir)
    if state is None:
        raise FedP2EFTError(f"{output_dir} holds no finished federated run to export")
    task = build_task(name_or_path, config) if task is None else task
    if not callable(getattr(task, "export", None)):
        return output_dir / state.checkpoint
    best = load_best(output_dir) if getattr(task, "best_metric", None) else None
    artifact = task.export(best[0] if best is not None else load_weights(output_dir, state), output_dir)
    if getattr(task, "keeps_client_state", False):
        from fedp2eft.core.pfl import record_client_states
        from fedp2eft.fl.checkpoint import last_accepted_round
        from fedp2eft.fl.protocol import CLIENT_STATE_FOLDER

        rounds = {client: last_accepted_round(state.history, client) for client in range(task.num_clients())}
        record_client_states(artifact, output_dir / CLIENT_STATE_FOLDER, rounds)
    return artifact


def build_task(name_or_path: str, config: dict[str, Any]) -> FederatedTask:
    """Build the task and check that it speaks the ``FederatedTask`` protocol."""
    task = resolve_factory(name_or_path)(dict(config))
    missing = [m for m in _REQUIRED_METHODS if not callable(getattr(task, m, None))]
    if missing:
        raise FedP2EFTError(f"task {name_or_path!r} returned {type(task).__name__}, which lacks {missing}")
    return task
