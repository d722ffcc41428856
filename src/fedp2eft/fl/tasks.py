"""Resolve a task name to a ``FederatedTask``: built-in names or any ``package.module:function`` factory.

Imports happen lazily so that the Flower layer never pulls a model library it does not need.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any, Callable

from fedp2eft.core.federation import FederatedTask
from fedp2eft.errors import FedP2EFTError

BUILTIN_TASKS: dict[str, str] = {
    "base": "fedp2eft.experiment:make_base_task",
    "toy": "fedp2eft.fl.toy_task:make_task",
}  # plus the federated stage of every personalization method (``psg``, ...), by its name

_REQUIRED_METHODS = ("initial_weights", "num_clients", "client_update")


def resolve_factory(name_or_path: str) -> Callable[[dict[str, Any]], FederatedTask]:
    """Return the ``make_task(config)`` callable behind a built-in name, a method's stage name or a dotted
    path."""
    target = BUILTIN_TASKS.get(name_or_path, name_or_path)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        from fedp2eft.core.methods import STAGES

        stages = sorted(STAGES)
        if name_or_path in stages:
            from fedp2eft.experiment import make_stage_task

            return functools.partial(make_stage_task, name_or_path)
        raise FedP2EFTError(
            f"unknown task {name_or_path!r}: use one of {sorted(BUILTIN_TASKS) + stages} "
            "or a factory path like 'package.module:make_task'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise FedP2EFTError(f"cannot import task module {module_name!r} for task {name_or_path!r}: {error}") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise FedP2EFTError(f"task factory {target!r} does not exist or is not callable")
    return factory


def export_final(name_or_path: str, config: dict[str, Any], output_dir: Path) -> Path:
    """Turn a finished run into the task's artifact (``ExportableTask.export``): the best weights kept for a task
    that names a ``best_metric`` (early stopping), else the last checkpoint; tasks without ``export`` keep the
    weights checkpoint as their result. A stateful task's artifact also notes where its clients keep their states
    and from which round (the simulation's client folder)."""
    from fedp2eft.fl.checkpoint import load_best, load_state, load_weights

    state = load_state(output_dir)
    if state is None:
        raise FedP2EFTError(f"{output_dir} holds no finished federated run to export")
    task = build_task(name_or_path, config)
    if not callable(getattr(task, "export", None)):
        return output_dir / state.checkpoint
    best = load_best(output_dir) if getattr(task, "best_metric", None) else None
    artifact = task.export(best[0] if best is not None else load_weights(output_dir, state), output_dir)
    if getattr(task, "keeps_client_state", False):
        from fedp2eft.core.pfl import record_client_states
        from fedp2eft.fl.server_app import last_accepted_round
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
