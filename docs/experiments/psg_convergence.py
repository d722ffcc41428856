"""Does PS-generator training converge? Train the generator of a benchmark profile at several learning-rate
scales of its stage 1 and print mean lambda and the stage-1 loss per round, with the round from which each curve
stays within ±5% of its final value (the report's rule). Only training curves are looked at, never test data.

    python docs/experiments/psg_convergence.py --scales 3 10 30 --rounds 30

The base model is trained once (as the benchmark would) and shared by every scale; runs go to
``results/psg-convergence/`` and resume like the benchmark's stages.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedp2eft.benchmark import runner
from fedp2eft.benchmark.config import resolve
from fedp2eft.benchmark.report.psg import flattening_round
from fedp2eft.core.methods import STAGES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", help="benchmark profile or YAML file")
    parser.add_argument("--scales", type=float, nargs="+", default=[3.0, 10.0, 30.0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("results/psg-convergence"))
    args = parser.parse_args()
    config = resolve(args.config, [f"psg.rounds={args.rounds}", "name=psg-convergence"])
    args.output.mkdir(parents=True, exist_ok=True)
    base_model = runner.stage_base(config, args.output)
    for scale in args.scales:
        run_dir = args.output / f"x{scale:g}"
        runner.stage_artifact(config, run_dir, base_model, STAGES["psg"], args.seed, scale)
        rows = [json.loads(line) for line in (run_dir / f"seed{args.seed}" / "psg" / "metrics.jsonl").read_text()
                .splitlines()]
        rounds = [row["round"] for row in rows]
        print(f"\nstage-1 learning rates x{scale:g} of the paper's")
        print("round  mean_lambda  stage1_loss")
        for row in rows:
            print(f"{row['round']:5d}  {row['train/mean_lambda']:11.4f}  {row['train/stage1_loss']:11.4f}")
        for key, label in (("train/mean_lambda", "mean lambda"), ("train/stage1_loss", "stage-1 loss")):
            flat = flattening_round(rounds, [row[key] for row in rows])
            print(f"{label}: " + (f"flat from round {flat}" if flat else f"not flat within {args.rounds} rounds"))


if __name__ == "__main__":
    main()
