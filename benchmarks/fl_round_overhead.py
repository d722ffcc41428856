"""Flower simulation overhead per round: wall time of a round vs the summed client compute inside it.

For each clients-per-round value it runs a short simulation (Ray backend), drops round 1 (actor
warm-up), and reports medians of: round wall time, summed client compute (``client_update`` only),
their ratio, and the overhead = wall time minus the best schedule of that compute on the parallel
ClientApp slots; plus the peak RSS of this process tree (driver + Ray processes), sampled every 0.1 s.
    python benchmarks/fl_round_overhead.py [--clients 2 4 8] [--rounds 4] [--task toy] [--task-config cfg.yaml]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

import psutil
import yaml

from fedp2eft.fl.simulation import run_federated

# A client that computes ~50 ms per update (SGD on a small MLP plus a fixed busy wait).
TOY_DEFAULT = {"num_clients": 8, "dim": 64, "hidden": 256, "local_steps": 20, "busy_ms": 20.0}


class PeakRss:
    """Samples the resident memory of this process (``peak_self``: in a simulation, the ServerApp and Flower's
    engine) and of it with all its descendants (``peak``: plus Ray's processes) in the background."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.peak = self.peak_self = 0
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        root = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                if proc is root:
                    self.peak_self = max(self.peak_self, rss)
            self.peak = max(self.peak, total)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def print_table(results: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """One line per result, a column per (header, key, format spec), right-aligned under its header; then the
    results as JSON, for scripts."""
    widths = [len(header) for header, _, _ in columns]
    print(" ".join(header for header, _, _ in columns))
    for result in results:
        print(" ".join(f"{result[key]:>{width}{spec}}" for (_, key, spec), width in zip(columns, widths)))
    print(json.dumps(results))


def measure(task: str, config: dict[str, Any], clients: int, rounds: int, num_cpus: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out, PeakRss() as rss:
        run_federated(task, config, rounds, clients, output_dir=out, num_cpus_per_client=num_cpus)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    slots = max(1, min(clients, int((psutil.cpu_count() or 1) / num_cpus)))
    # Best possible round time with `slots` ClientApps in parallel; the rest is Flower/Ray overhead.
    ideal = [max(r["client_time_max_s"], r["client_time_sum_s"] / slots) for r in steady]
    wall = statistics.median(r["round_time_s"] for r in steady)
    compute = statistics.median(r["client_time_sum_s"] for r in steady)
    overhead = statistics.median(r["round_time_s"] - i for r, i in zip(steady, ideal))
    return {"clients_per_round": clients, "round_wall_s": wall, "client_compute_sum_s": compute,
            "wall_over_compute": wall / compute if compute > 0 else float("inf"),
            "parallel_slots": slots, "overhead_s": overhead, "peak_rss_mib": rss.peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--task", default="toy", help="'toy', 'psg', 'base' or package.module:make_task")
    parser.add_argument("--task-config", type=Path, help="YAML task config (default: a small toy config)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPU cores per simulated client")
    args = parser.parse_args()
    if args.task_config:
        config = yaml.safe_load(args.task_config.read_text())
    elif args.task == "toy":
        config = dict(TOY_DEFAULT, num_clients=max(args.clients))
    else:
        parser.error("--task-config is required for tasks other than 'toy'")
    results = [measure(args.task, config, n, args.rounds, args.num_cpus) for n in args.clients]
    print(f"\ntask={args.task} rounds={args.rounds} (median of rounds 2..{args.rounds}) "
          f"cores={psutil.cpu_count()} cpus/client={args.num_cpus}")
    print_table(results, [("clients", "clients_per_round", "d"), ("round wall s", "round_wall_s", ".3f"),
                          ("client sum s", "client_compute_sum_s", ".3f"), ("wall/sum", "wall_over_compute", ".2f"),
                          ("slots", "parallel_slots", "d"), ("overhead s", "overhead_s", ".3f"),
                          ("peak RSS MiB", "peak_rss_mib", ".0f")])


if __name__ == "__main__":
    main()
