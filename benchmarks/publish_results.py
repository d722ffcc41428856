"""Copy a finished benchmark run's report into the docs: ``docs/results.md`` plus its figures and raw
files under ``docs/results/<run>/``.

    python benchmarks/publish_results.py results/default docs

Nothing is typed by hand: the page is the run's own ``report.md`` with figure links pointing at the copies."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("docs_dir", type=Path)
    parser.add_argument("--page", default="results.md", help="file name of the page in docs_dir")
    args = parser.parse_args()
    target = args.docs_dir / "results" / args.run_dir.name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(args.run_dir / "figures", target / "figures")
    report = (args.run_dir / "report.md").read_text()
    prefix = f"results/{args.run_dir.name}/"
    report = report.replace("](figures/", f"]({prefix}figures/")
    for name in ("config.yaml", "personalize.jsonl", "results.csv", "results.json", "selection.json", "timings.json"):
        if (args.run_dir / name).exists():
            shutil.copy2(args.run_dir / name, target / name)
            report = report.replace(f"]({name})", f"]({prefix}{name})")
    for metrics in sorted(args.run_dir.glob("seed*/psg/metrics.jsonl")):  # the generator's training curves
        copy = target / metrics.relative_to(args.run_dir)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(metrics, copy)
    (args.docs_dir / args.page).write_text(report)
    print(f"wrote {args.docs_dir / args.page} and {target}")


if __name__ == "__main__":
    main()
