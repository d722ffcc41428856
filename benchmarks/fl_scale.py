"""Does the Flower layer scale with the clients of a round, not with the clients registered? Runs the simulation
with 1,000 and 10,000 virtual clients (the toy task: a tiny MLP), the same clients per round, and prints for each:
the start-up (wall time outside the rounds: Ray, the simulation engine, finding the clients), the median round
time (rounds 2..), and the peak resident memory of this process (the ServerApp and Flower's engine) and of the
whole process tree, then the 10,000 / 1,000 ratios (target: within 1.2 for the rounds and the server's memory).

    python benchmarks/fl_scale.py [--clients 1000 10000] [--per-round 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from fl_round_overhead import PeakRss, print_table

from fedp2eft.fl.simulation import run_federated

TOY = {"dim": 8, "hidden": 16, "local_steps": 5}


def measure(registered: int, per_round: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out, PeakRss() as rss:
        start = time.perf_counter()
        run_federated("toy", {**TOY, "num_clients": registered}, rounds, per_round, output_dir=out,
                      min_clients=per_round)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rounds_s = [row["round_time_s"] for row in rows]
    sampled = {client for row in rows for client in row["clients"]}  # proof that the whole population was reachable
    return {"registered": registered, "per_round": per_round, "startup_s": wall - sum(rounds_s),
            "largest_client_sampled": max(sampled),
            "round_s": statistics.median(rounds_s[1:] or rounds_s), "server_peak_mib": rss.peak_self / 2**20,
            "tree_peak_mib": rss.peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = [measure(n, args.per_round, args.rounds) for n in args.clients]
    print(f"\ntoy task {TOY}, {args.per_round} clients per round, {args.rounds} rounds (round time: median of "
          f"rounds 2..{args.rounds})")
    print_table(results, [("registered", "registered", "d"), ("largest sampled", "largest_client_sampled", "d"),
                          ("start-up s", "startup_s", ".1f"), ("round s", "round_s", ".2f"),
                          ("server peak MiB", "server_peak_mib", ".0f"), ("tree peak MiB", "tree_peak_mib", ".0f")])
    first, last = results[0], results[-1]
    print(f"ratio {last['registered']} / {first['registered']} clients: start-up "
          f"{last['startup_s'] / first['startup_s']:.2f}, round {last['round_s'] / first['round_s']:.2f}, "
          f"server peak memory {last['server_peak_mib'] / first['server_peak_mib']:.2f}")


if __name__ == "__main__":
    main()
