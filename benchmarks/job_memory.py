"""Peak memory of a whole job: every process it starts (benchmark workers, Flower's and Ray's), not only the largest.

    .venv/bin/python benchmarks/job_memory.py [--interval 1.0] -- fedp2eft -q benchmark

GNU time's "maximum resident set size" is the largest single process's peak; a benchmark runs its main process, two
worker processes each holding a base model, and, during a federated stage, Ray's processes and actors. This script
runs the command, samples its process tree (the command and all its descendants) every ``--interval`` seconds and
prints, at the end, the peak of the tree's summed memory by two measures:

- RSS summed over processes: an upper bound, since pages shared between processes (the torch libraries every
  process maps, copy-on-write pages of forked workers) count once per process;
- PSS (proportional set size, Linux): each shared page divided among the processes that map it, so the sum is the
  memory the job really holds. This is the figure to compare with a machine's RAM.

It also prints every process of the tree at the PSS peak with its own PSS, and the command's wall time and exit
status (which it returns). Sampling misses peaks shorter than the interval.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil

GIB = 2**30


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def sample(processes: list[psutil.Process]) -> tuple[int, int, list[tuple[int, str]]]:
    """Summed RSS and PSS of ``processes`` (those that ended meanwhile are skipped) and each one's (PSS, name)."""
    rss = pss = 0
    each = []
    for process in processes:
        try:
            info = process.memory_full_info()
            name = " ".join(process.cmdline())[:110] or process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += info.rss
        pss += info.pss
        each.append((info.pss, name))
    return rss, pss, each


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the job, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    start = time.perf_counter()
    child = subprocess.Popen(command)
    root = psutil.Process(child.pid)
    peak_rss = peak_pss = 0
    at_peak: list[tuple[int, str]] = []
    while child.poll() is None:
        rss, pss, each = sample(tree(root))
        peak_rss = max(peak_rss, rss)
        if pss > peak_pss:
            peak_pss, at_peak = pss, each
        time.sleep(args.interval)
    wall = time.perf_counter() - start
    print(f"job memory: peak PSS {peak_pss / GIB:.2f} GiB summed over {len(at_peak)} processes; peak RSS summed "
          f"{peak_rss / GIB:.2f} GiB (counts shared pages once per process); wall {wall / 60:.1f} min, exit status "
          f"{child.returncode}", file=sys.stderr)
    print("processes at the PSS peak, largest first:", file=sys.stderr)
    for pss, name in sorted(at_peak, reverse=True):
        print(f"  {pss / GIB:6.2f} GiB  {name}", file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
