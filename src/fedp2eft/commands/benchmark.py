"""``fedp2eft benchmark``: the full protocol from a profile or YAML config plus key=value overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedp2eft.interrupt import resumable


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="base model -> PS generator -> personalize seen and unseen clients -> report",
        description="Run (or resume) the FedP²EFT benchmark. Finished stages are not redone.",
    )
    parser.add_argument("--config", default="default",
                        help="profile name (default, quick, paper, paper-fedaya) or a YAML file "
                             "(default: %(default)s)")
    parser.add_argument("--results", type=Path, default=Path("results"),
                        help="where run folders go (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, YAML values checked against the profile's types, e.g. "
                             "budgets=[2,8] psg.rounds=5 personalize.lora_lr=1e-4 name=my-run (default: none)")
    parser.set_defaults(func=run)
    report = subparsers.add_parser(
        "report", help="write a finished benchmark run's report again with this version (nothing is trained)",
        description="Write report.md, results.json, results.csv and figures/ of a finished run again from its own "
                    "files (config.yaml, personalize.jsonl, timings.json), with this version's report.",
    )
    report.add_argument("run_dir", type=Path, help="the run folder `fedp2eft benchmark` wrote, e.g. results/default")
    report.set_defaults(func=rewrite)


def run(args: argparse.Namespace) -> int:
    from fedp2eft.benchmark.config import resolve
    from fedp2eft.benchmark.runner import run as run_benchmark

    config = resolve(args.config, args.overrides)
    with resumable(f"run {config['name']}", "the same command resumes it (finished stages are kept)"):
        run_dir = run_benchmark(config, args.results, args.command_line)
    print(f"report: {run_dir / 'report.md'}")
    return 0


def rewrite(args: argparse.Namespace) -> int:
    from fedp2eft.benchmark.runner import rewrite_report

    print(f"report: {rewrite_report(args.run_dir) / 'report.md'}")
    return 0
