"""Where do the budget-heterogeneous peers' scores come from: the federated adapter they start from, or their
personalization?

Nested-rank LoRA, HetLoRA and FlexLoRA train a LoRA over the seen clients for their stage's rounds before any
client personalizes, on top of the same base model that every method starts from; uniform LoRA and FedP²EFT start
from the base model alone. This script scores, for every unseen client, the base model and each peer's adapter
cut at each budget *without any fine-tuning*, on the client's own training sentences: neither the base model nor
any stage saw them (the stages train on the seen pool), and no test sentence is read.

    python docs/experiments/peer_starts.py --run results/budget-peers [--seed 0]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from fedp2eft.benchmark.run_folder import finished_artifact, saved_config
from fedp2eft.core.methods import METHODS, PersonalizeConfig
from fedp2eft.core.personalization import personal_lora
from fedp2eft.core.prefix_lora import leading
from fedp2eft.experiment import Setup
from fedp2eft.logs import quiet_third_party

PEERS = ("nested-lora", "hetlora", "flexlora")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a benchmark run folder with the peers' stages")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet_third_party()
    config = saved_config(args.run)
    setup = Setup(str(args.run / "base" / "model"), config["dataset"], dict(config["dataset_options"]),
                  config["max_length"])
    base = setup.load_base_model()
    personal = PersonalizeConfig.from_dict(config["personalize"])
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
                cut = leading(factors, budget)
                model = personal_lora(base, dict.fromkeys(cut, budget), personal.seed)
                modules = dict(model.base_model.model.named_modules())
                with torch.no_grad():
                    for name, (a, b) in cut.items():
                        modules[name].lora_A["default"].weight.copy_(a)
                        modules[name].lora_B["default"].weight.copy_(b)
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


if __name__ == "__main__":
    main()
