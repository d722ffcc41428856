"""Does the PS generator rank the entries it keeps, or do its outputs tie, so that a small budget's rank map is a
tie-break?

The generator is fitted each round by a few Adam steps of L1 regression from a fresh optimizer state (the paper's
stage 2). The L1 gradient of an output is the sign of its error times the last layer's input, which every output
shares; so under any first-order optimizer every output whose error had the same sign at the same steps gets the
same update, and outputs that started equal (the generator starts every output at 1e-4) stay equal. Adam's first
steps from a fresh state do the same to an L2 loss (they move each parameter by about its learning rate whatever
the gradient's size); only a step that scales with the error separates them. Part 1 shows this on a bare linear
layer; part 2 measures it on a benchmark run's generator: for each unseen client, the generator's Lambda
(computed from the client's training inputs, as personalization does), the largest group of equal entries, and
per budget r how many of the r x M kept entries come from a tie group that the cut at r x M splits (those are
chosen by ``torch.topk``'s tie order, not by the generator). No test data are read.

    python docs/experiments/psg_plateaus.py --run results/default [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fedp2eft.benchmark.run_folder import finished_base, saved_config
from fedp2eft.core.budget import TIE_TOLERANCE, chosen_by_tie_order, top_entries_mask
from fedp2eft.core.generator import PSGenerator
from fedp2eft.core.personalization import features_for
from fedp2eft.experiment import Setup
from fedp2eft.logs import quiet_third_party


def sign_descent_demo() -> None:
    """Part 1: ten steps of regression of a linear layer from a fresh state, as stage 2 takes them (Adam, L1), and
    with the other optimizer and loss."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 6)
    with torch.no_grad():
        layer.weight.mul_(1e-6)
        layer.bias.fill_(1e-4)
    x = torch.rand(8)
    target = torch.tensor([5.0, 3.0, 0.5, 0.2, 1e-5, 1e-5])  # four above the start, two below
    print(f"  targets {[round(float(v), 6) for v in target]}")
    for loss_name, power in (("L1", 1), ("L2", 2)):
        for name, optimizer in (("Adam", torch.optim.Adam), ("SGD", torch.optim.SGD)):
            fitted = torch.nn.Linear(8, 6)
            fitted.load_state_dict(layer.state_dict())
            step = optimizer(fitted.parameters(), lr=1e-2)
            for _ in range(10):
                loss = (fitted(x) - target).abs().pow(power).sum()
                step.zero_grad()
                loss.backward()
                step.step()
            with torch.no_grad():
                print(f"  {loss_name} + {name}: outputs {[round(float(v), 6) for v in fitted(x)]}")


def tie_groups(values: torch.Tensor) -> list[int]:
    """Sizes of the runs of equal values in ``values`` sorted in descending order."""
    sizes, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or float(values[start] - values[i]) > TIE_TOLERANCE * abs(float(values[start])):
            sizes.append(i - start)
            start = i
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a benchmark run folder with a trained generator")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet_third_party()
    print("Part 1, the mechanism on a bare linear layer (10 steps, lr 1e-2, from the generator's start):")
    sign_descent_demo()

    config = saved_config(args.run)
    base_path = finished_base(config, args.run)  # the run's own base, or the checkpoint it reused
    setup = Setup(base_path, config["dataset"], dict(config["dataset_options"]), config["max_length"])
    base = setup.load_base_model()
    generator = PSGenerator.load(args.run / f"seed{args.seed}" / "psg" / "generator.safetensors")
    spec = generator.spec
    modules = len(spec.module_names)
    print(f"\nPart 2, {args.run} seed {args.seed}: M = {modules} modules x R = {spec.rank}; unseen clients; a tie is a "
          f"difference below {TIE_TOLERANCE:g} of the value")
    budgets = sorted(config["budgets"])
    print("client | language | largest tie group (its value) | distinct levels in the top 16M | "
          + " | ".join(f"r={b}: kept entries chosen by tie order" for b in budgets))
    for client in setup.data.unseen:
        with torch.no_grad():
            scales = generator(features_for(base, setup.task, client.train, spec)).flatten().float()
        ordered = scales.sort(descending=True).values
        groups = tie_groups(ordered)
        biggest = max(range(len(groups)), key=groups.__getitem__)
        # the kept entries of the group the cut splits: the count budget selection records (core/budget.py)
        cuts = [f"{chosen_by_tie_order(scales, top_entries_mask(scales, modules, budget))} of {budget * modules}"
                for budget in budgets]
        top = tie_groups(ordered[: 16 * modules])
        print(f"{client.client_id} | {client.language} | {groups[biggest]} ({float(ordered[sum(groups[:biggest])]):.4f})"
              f" | {len(top)} | " + " | ".join(cuts))


if __name__ == "__main__":
    main()
