"""Two ablations behind docs/discussion.md, on a finished benchmark run (its base model and PS generator):

1. learning rate: plain LoRA (r=8) at the paper's 1e-4 and at x10 / x30, against the un-personalized base;
2. lambda magnitude: FedP²EFT with the generator's kept lambdas as they are vs rescaled to mean 1, at r=2, 16.

    python benchmarks/personalize_ablation.py results/default [--clients 6]

Accuracy is pooled over every 4th unseen client (``--clients`` of them); each line also prints the ratio to
the base model measured in the same run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from fedp2eft.core.budget import select_top_ranks
from fedp2eft.core.generator import PSGenerator
from fedp2eft.core.methods import PersonalizeConfig, features_for, finetune_selection, generator_spec, personalize
from fedp2eft.experiment import Setup
from fedp2eft.logs import quiet_third_party


def pooled(setup: Setup, clients, build) -> float:
    correct = count = 0
    for client in clients:
        metrics = setup.task.evaluate(build(client), client.test)
        correct, count = correct + metrics["correct"], count + metrics["count"]
    return correct / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--clients", type=int, default=6)
    args = parser.parse_args()
    quiet_third_party()
    torch.set_num_threads(2)
    config = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    base_dir = str(args.run_dir / "base" / "model")
    setup = Setup(base_dir, config["dataset"], config["dataset_options"], config["max_length"])
    base = setup.load_base_model()
    clients = setup.data.unseen[::4][: args.clients]
    tuned = PersonalizeConfig.from_dict(config["personalize"])
    spec = generator_spec(base, tuned, base_dir)
    generator = PSGenerator.load(args.run_dir / "psg" / "generator.safetensors", expected=spec)

    reference = pooled(setup, clients, lambda client: base)
    print(f"{len(clients)} unseen clients; base model accuracy {reference:.3f}")
    for lr in (1e-4, 1e-3, 3e-3):
        config_lr = PersonalizeConfig.from_dict({**config["personalize"], "lora_lr": lr})
        score = pooled(setup, clients, lambda c: personalize("lora", base, setup.task, c.train, 8, config_lr).model)
        print(f"lora r=8 lr={lr:g}: {score:.3f} ({score / reference:.2f}x base)")

    kept_means: list[float] = []

    def fedp2eft(budget: int, normalize: bool):
        def build(client):
            scales = generator(features_for(base, setup.task, client.train, spec)).detach()
            selection = select_top_ranks(scales, list(spec.module_names), spec.rank, budget)
            mean = torch.cat(list(selection.values.values())).mean()
            kept_means.append(float(mean))
            if normalize:
                selection.values = {name: value / mean for name, value in selection.values.items()}
            return finetune_selection(base, selection, setup.task, client.train, tuned).model
        return build

    for budget in (2, 16):
        for normalize in (False, True):
            score = pooled(setup, clients, fedp2eft(budget, normalize))
            label = "kept lambdas rescaled to mean 1" if normalize else "kept lambdas as generated"
            print(f"fedp2eft r={budget}, {label}: {score:.3f} ({score / reference:.2f}x base)")
    print(f"mean of the kept lambdas as generated: {sum(kept_means) / len(kept_means):.2f} "
          f"(min {min(kept_means):.2f}, max {max(kept_means):.2f} over clients and budgets)")


if __name__ == "__main__":
    main()
