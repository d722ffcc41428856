"""Copy a finished benchmark run's report into the docs: ``docs/results.md`` plus its figures and raw
files under ``docs/results/<run>/``.

    python benchmarks/publish_results.py results/default docs
    python benchmarks/publish_results.py results/pfl docs --page results-pfl.md

A run over several base models (``base.algorithm`` a list) keeps one full run per base in a sub-folder; each is
published under ``docs/results/<run>/<base>/`` and the top page's links follow it.
Nothing is typed by hand: the page is the run's own ``report.md`` with links pointing at the copies."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

RAW_FILES = ("config.yaml", "personalize.jsonl", "results.csv", "results.json", "selection.json", "timings.json")


def publish(run_dir: Path, target: Path, prefix: str) -> str:
    """Copy ``run_dir``'s figures, raw files, generator curves and base sub-runs to ``target``; returns its
    report with every link to those files rewritten to start with ``prefix`` (their path from the page)."""
    target.mkdir(parents=True, exist_ok=True)
    report = (run_dir / "report.md").read_text()
    if (run_dir / "figures").is_dir():
        shutil.copytree(run_dir / "figures", target / "figures")
        report = report.replace("](figures/", f"]({prefix}figures/")
    for name in RAW_FILES:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, target / name)
            report = report.replace(f"]({name})", f"]({prefix}{name})")
    # training curves and byte counts of every federated stage
    for metrics in sorted([*run_dir.glob("base/metrics.jsonl"), *run_dir.glob("seed*/*/metrics.jsonl")]):
        copy = target / metrics.relative_to(run_dir)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(metrics, copy)
    for part in sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / "report.md").is_file()):
        # a base's own report links relative to its folder, which the copy keeps (publish creates the folder)
        (target / part.name / "report.md").write_text(publish(part, target / part.name, ""))
        report = report.replace(f"]({part.name}/report.md)", f"]({prefix}{part.name}/report.md)")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("docs_dir", type=Path)
    parser.add_argument("--page", default="results.md", help="file name of the page in docs_dir")
    args = parser.parse_args()
    target = args.docs_dir / "results" / args.run_dir.name
    shutil.rmtree(target, ignore_errors=True)
    report = publish(args.run_dir, target, f"results/{args.run_dir.name}/")
    (args.docs_dir / args.page).write_text(report)
    print(f"wrote {args.docs_dir / args.page} and {target}")


if __name__ == "__main__":
    main()
