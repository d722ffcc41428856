"""Where do the budget-heterogeneous peers' scores come from: the federated adapter they start from, or their
personalization?

Nested-rank LoRA, HetLoRA and FlexLoRA train a LoRA over the seen clients for their stage's rounds before any
client personalizes, on top of the same base model that every method starts from; uniform LoRA and FedP²EFT start
from the base model alone. This script scores, for every unseen client, the base model and each peer's adapter
cut at each budget *without any fine-tuning*, on the client's own training sentences: neither the base model nor
any stage saw them (the stages train on the seen pool), and no test sentence is read.

With ``--against OTHER_RUN`` (a run of uniform LoRA and FedP²EFT on a base model trained for as many federated rounds
as the peers' base plus their stage: ``base.rounds=32`` against 12 + 20), it also prints, from both runs' results,
that run's methods minus each peer per pool and budget, paired over the same clients (95% client-bootstrap
interval): the comparison at equal rounds of federated training. These are test scores, read to describe, not to
choose anything.

    python docs/experiments/peer_starts.py --run results/budget-peers [--seed 0] [--against results/budget-peers-base32]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path


from fedp2eft.benchmark.report.stats import paired_bootstrap
from fedp2eft.benchmark.run_folder import finished_artifact, read_jsonl, saved_config
from fedp2eft.core.methods import METHODS, personalize_config
from fedp2eft.core.prefix_lora import leading, lora_from
from fedp2eft.experiment import Setup
from fedp2eft.logs import quiet_third_party

PEERS = ("nested-lora", "hetlora", "flexlora")


def units(run: Path) -> dict[tuple[str, str, int], dict]:
    """(pool, method, budget) -> the report's units {(seed, client): (language, correct, count)} of a run."""
    found: dict[tuple[str, str, int], dict] = defaultdict(dict)
    for record in read_jsonl(run / "personalize.jsonl"):
        for row in record["rows"]:
            found[(record["pool"], row["method"], row["budget"])][(record["seed"], record["client"])] = (
                record["language"], row["correct"], row["count"])
    return found


def against(peers_run: Path, other_run: Path, budgets: list[int]) -> None:
    ours, theirs = units(other_run), units(peers_run)
    print(f"\n{other_run} minus {peers_run} (accuracy points, paired over clients, 95% interval)")
    for pool in ("seen", "unseen"):
        for method in sorted({m for p, m, b in ours if p == pool and b}):
            for peer in PEERS:
                cells = []
                for budget in budgets:
                    d = paired_bootstrap(ours[(pool, method, budget)], theirs[(pool, peer, budget)])
                    cells.append(f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]")
                print(f"{pool} | {method} minus {peer} | " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a benchmark run folder with the peers' stages")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--against", type=Path, help="a run of other methods at equal rounds of federated training")
    args = parser.parse_args()
    quiet_third_party()
    config = saved_config(args.run)
    setup = Setup(str(args.run / "base" / "model"), config["dataset"], dict(config["dataset_options"]),
                  config["max_length"])
    base = setup.load_base_model()
    personal = personalize_config(config["personalize"])
    budgets = sorted(config["budgets"])
    adapters = {}
    for method in PEERS:
        stage = METHODS[method].stage
        adapters[method] = stage.load(finished_artifact(config, args.run, stage, args.seed), base, personal, "")
    correct: dict[tuple[str, int], int] = defaultdict(int)
    count: dict[tuple[str, int], int] = defaultdict(int)
    for client in setup.data.unseen:
        scores = {("base", 0): setup.task.evaluate(base, client.train)}
        for method, factors in adapters.items():
            for budget in budgets:
                model, _ = lora_from(base, leading(factors, budget), personal.seed)
                scores[(method, budget)] = setup.task.evaluate(model, client.train)
        for key, score in scores.items():
            correct[key] += score["correct"]
            count[key] += score["count"]
    print(f"{args.run}, seed {args.seed}: accuracy on the unseen clients' training sentences (pooled over "
          f"{len(setup.data.unseen)} clients), before any personalization")
    print("start | " + " | ".join(f"r={b}" for b in budgets))
    print(f"base model | {100 * correct[('base', 0)] / count[('base', 0)]:.1f} (every budget)")
    for method in PEERS:
        print(f"{method} cut | " + " | ".join(f"{100 * correct[(method, b)] / count[(method, b)]:.1f}" for b in budgets))
    if args.against:
        against(args.run, args.against, budgets)


if __name__ == "__main__":
    main()
