"""Run a federated job in Flower's simulation engine (Ray backend) from Python.

The ServerApp runs in this process (in a thread) and reuses the task built here for the
initial weights; each Ray actor builds its own copy once and keeps it for the whole run.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from flwr.app import Context
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from flwr.simulation.run_simulation import DEFAULT_SIMULATION_CONFIG

from fedp2eft.core.device import visible_gpus
from fedp2eft.core.federation import FederatedTask
from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl.client_app import app as client_app
from fedp2eft.fl.job import Job
from fedp2eft.fl.protocol import CLIENT_STATE_FOLDER
from fedp2eft.fl.server_app import serve
from fedp2eft.fl.tasks import build_task
from fedp2eft.logs import plain_flower_logs


# The server asks every virtual node once for its client index; through the simulation engine a query costs about
# 31 ms of the machine (10,000 virtual clients on 2 cores: 313 s, benchmarks/fl_scale.py), so the start-up may take
# 0.1 s per virtual client, not only Job's default (queries still unanswered at the deadline would delay the rounds).
DISCOVERY_S_PER_CLIENT = 0.1
MAX_CLIENTS_PER_GPU = 4  # more actors per GPU than this mostly add model copies to its memory


def start_ray(settings: dict[str, Any], verbose: bool) -> None:
    """Start Ray here, in the calling thread, with the arguments Flower's simulation would use; Flower then finds it
    running and uses it. Left to Flower, Ray starts in the simulation engine's thread while the ServerApp's thread
    is already running, and Ray spawns its servers with a ``preexec_fn``, which Python documents as unsafe when other
    threads exist: a fork taken while another thread holds a lock can deadlock the child before it runs, and the
    parent waits forever (seen: a test's simulation hung in ``Popen`` for Ray's GCS server until its 600 s timeout)."""
    if ray.is_initialized():
        return
    init_args = dict(settings.get("init_args", {}))
    if not verbose:
        init_args.setdefault("logging_level", DEFAULT_SIMULATION_CONFIG.init_args_logging_level)
        init_args.setdefault("log_to_driver", DEFAULT_SIMULATION_CONFIG.init_args_log_to_driver)
    RayBackend({**settings, "init_args": init_args})  # its constructor starts Ray as Flower's engine would


def default_gpus_per_client(clients_per_round: int) -> float:
    """The GPU share each virtual client asks for by default: 0 without a visible CUDA GPU; otherwise the
    visible GPUs split over the round's clients (``gpus / clients_per_round``), at most 1 and at least
    ``1 / MAX_CLIENTS_PER_GPU``."""
    gpus = visible_gpus()
    if gpus == 0:
        return 0.0
    share = gpus / max(1, clients_per_round)
    return min(1.0, max(share, 1.0 / MAX_CLIENTS_PER_GPU))


def backend_settings(num_cpus_per_client: float, backend_config: dict[str, Any] | None,
                     num_gpus_per_client: float | None = None, clients_per_round: int = 1) -> dict[str, Any]:
    """Ray backend config: one client per ``num_cpus_per_client`` cores and ``num_gpus_per_client`` GPUs.

    ``num_gpus_per_client=None`` picks :func:`default_gpus_per_client` for ``clients_per_round``: 0.0 on a
    machine without a CUDA GPU (CPU-only clients), else a fraction such as 1/clients_per_round (capped to
    [1/MAX_CLIENTS_PER_GPU, 1]), so that Ray packs the round's clients onto the GPUs it sees. A fraction only
    schedules: the federated tasks still load their models on the CPU (docs/method.md, "GPU").
    ``backend_config`` entries override all of this section by section."""
    cores = os.cpu_count() or 1
    if not 0 < num_cpus_per_client <= cores:
        raise FedP2EFTError(f"num_cpus_per_client must be in (0, {cores}] on this machine, got {num_cpus_per_client}")
    if num_gpus_per_client is None:
        num_gpus_per_client = default_gpus_per_client(clients_per_round)
    gpus = visible_gpus()
    if num_gpus_per_client < 0 or (num_gpus_per_client > 0 and gpus == 0):
        raise FedP2EFTError(
            f"num_gpus_per_client={num_gpus_per_client} needs a value >= 0, and 0 on a machine without a visible "
            f"CUDA GPU (this one has {gpus}); leave it unset to choose automatically"
        )
    settings: dict[str, Any] = {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": float(num_gpus_per_client)},
        "init_args": {"include_dashboard": False},
    }
    for section, values in (backend_config or {}).items():
        if isinstance(values, dict) and isinstance(settings.get(section), dict):
            settings[section] = {**settings[section], **values}
        else:
            settings[section] = values
    return settings


def run_federated(
    task_name: str,
    task_config: dict[str, Any],
    rounds: int,
    clients_per_round: int,
    *,
    output_dir: str | Path,
    min_clients: int = Job.min_clients,
    seed: int = Job.seed,
    round_timeout_s: float = Job.round_timeout_s,
    startup_timeout_s: float | None = None,
    resume: bool = Job.resume,
    num_cpus_per_client: float = 1.0,
    num_gpus_per_client: float | None = None,
    backend_config: dict[str, Any] | None = None,
    verbose: bool = False,
    strategy: str = Job.strategy,
    dp: dict[str, float] | None = Job.dp,
    secagg: dict[str, float] | None = Job.secagg,
    task: FederatedTask | None = None,
) -> Path:
    """Train ``task_name`` for ``rounds`` FedAvg rounds in simulation; return the final checkpoint path.

    One virtual SuperNode per task client (node i has partition-id i). Raises
    ``FedP2EFTError`` when a round has fewer than ``min_clients`` valid replies; the last
    finished round's checkpoint in ``output_dir`` then stays usable for ``resume=True``. Each client gets
    ``num_cpus_per_client`` cores and ``num_gpus_per_client`` GPUs (default: 0 without a GPU, a share of the
    GPUs otherwise; see :func:`backend_settings`). Clients of a stateful task keep their state under
    ``output_dir/clients`` (one folder per virtual node: ``core/client_state.py``). ``dp`` ({noise_multiplier,
    clipping_norm, delta}) trains with user-level differential privacy (``privacy.py``); ``secagg`` (SecAgg+
    settings, ``{}`` for the defaults) aggregates with secure aggregation (``secure_aggregation.py``). ``task``, the
    task already built from (``task_name``, ``task_config``), spares the server side a second model load (the
    caller exports from it too: ``export_final``). ``startup_timeout_s`` defaults to Job's, or to 0.1 s per virtual
    client when that is longer (``DISCOVERY_S_PER_CLIENT``).
    """
    startup = Job.startup_timeout_s if startup_timeout_s is None else startup_timeout_s
    job = Job(task=task_name, task_config=dict(task_config), rounds=rounds, clients_per_round=clients_per_round,
              min_clients=min_clients, seed=seed, output_dir=str(Path(output_dir).resolve()),
              round_timeout_s=round_timeout_s, startup_timeout_s=startup, resume=resume, strategy=strategy, dp=dp,
              secagg=secagg, client_state_dir=str(Path(output_dir).resolve() / CLIENT_STATE_FOLDER))  # checked first
    task = build_task(job.task, job.task_config) if task is None else task
    if startup_timeout_s is None:
        job = replace(job, startup_timeout_s=max(job.startup_timeout_s, DISCOVERY_S_PER_CLIENT * task.num_clients()))
    settings = backend_settings(num_cpus_per_client, backend_config, num_gpus_per_client, clients_per_round)
    finished: list[Path] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        finished.append(serve(grid, job, task))

    plain_flower_logs()
    start_ray(settings, verbose)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=task.num_clients(),
                       backend_name="ray", backend_config=settings, verbose_logging=verbose)
    finally:
        ray.shutdown()  # Flower's backend shuts Ray down when it ends; not when the simulation failed to start
    if not finished:
        raise FedP2EFTError(f"the simulation stopped before the job finished; see the log and {job.output_dir}")
    return finished[0]
