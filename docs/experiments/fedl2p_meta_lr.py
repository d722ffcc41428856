"""Why FedL2P's learned learning rates stay at 1: its meta-nets trained at several meta learning rates on the
main job's base model and seen clients, and how far their multipliers move (docs/discussion.md, "FedL2P").

FedL2P's stage (core/methods/fedl2p/meta_training.py) runs ``FedL2PTask.client_update`` on a few seen clients per round and averages the
meta-nets (equal client sizes: a plain mean). This script does exactly that, in one process, for ``--rounds``
rounds of ``--clients`` clients, once per meta learning rate of ``--meta-lrs`` (every other setting the default
profile's, base learning rates at uniform LoRA's selected scale), and prints per meta learning rate:

- the multipliers the resulting meta-nets give every unseen client (min, max, and the mean over tensors of
  |multiplier - 1|), for all budgets: what FedL2P's personalization would use;
- the clients' validation loss after fine-tuning with the meta-nets a round starts from, in the first and in the
  last round (``val_loss_before``), and within a client's update after its outer steps (``val_loss_after``):
  the signal FedL2P itself trains on, from the *training* data of seen clients (their 80/20 split). No test data.

    python docs/experiments/fedl2p_meta_lr.py --run results/default [--meta-lrs 1e-4 1e-3 1e-2] [--rounds 2] [--clients 2]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from fedp2eft.benchmark.lr_selection import stage_rates_of_run
from fedp2eft.benchmark.run_folder import finished_run_model
from fedp2eft.core.methods import stage_named
from fedp2eft.core.methods.fedl2p.meta_training import FedL2PConfig, FedL2PTask
from fedp2eft.core.personalization import PersonalizeConfig, features_for
from fedp2eft.logs import quiet_third_party


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run folder of the intent benchmark (default or full profile)")
    parser.add_argument("--meta-lrs", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2, help="seen clients per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_third_party()
    config, setup, base = finished_run_model(args.run)
    base_path = setup.model
    # the rate the stage itself trains at (fedl2p.lr_scale, e.g. uniform LoRA's selected scale)
    scale, rates = stage_rates_of_run(config, args.run, stage_named("fedl2p"))
    personalize = PersonalizeConfig.from_dict(rates)
    training = {key: value for key, value in config["fedl2p"]["training"].items() if key != "meta_lr"}
    seen, unseen = setup.data.pool("seen"), setup.data.pool("unseen")
    per_language = config["dataset_options"]["clients_per_language"]  # seen clients come language by language
    order = sorted(range(len(seen)), key=lambda client: (client % per_language, client))  # one of each language first
    if args.rounds * args.clients > len(seen):
        parser.error(f"{args.rounds} rounds x {args.clients} clients need more than the {len(seen)} seen clients")
    print(f"base model {base_path}; uniform LoRA's scale x{scale:g}; {args.rounds} rounds x "
          f"{args.clients} seen clients per meta learning rate; multipliers on {len(unseen)} unseen clients")
    for meta_lr in args.meta_lrs:
        fedl2p = replace(FedL2PConfig.from_dict({**training, "meta_lr": meta_lr}), personalize=personalize)
        task = FedL2PTask(base, setup.task, seen, fedl2p, config["model"], config["budgets"])
        weights = task.initial_weights()
        spec = next(iter(task.specs.values()))
        start, first, last = time.perf_counter(), None, None
        for round_ in range(1, args.rounds + 1):
            clients = order[(round_ - 1) * args.clients: round_ * args.clients]
            updates = [task.client_update(weights, client, round_) for client in clients]
            weights = {key: torch.stack([u.weights[key] for u in updates]).mean(0) for key in weights}
            losses = {key: sum(u.metrics[key] for u in updates) / len(updates)
                      for key in ("val_loss_before", "val_loss_after")}
            first = first or losses
            last = losses
        features = [features_for(base, setup.task, client.train, spec) for client in unseen]
        multipliers = torch.cat([task.metanet(weights, budget)(x).detach() for budget in task.specs for x in features])
        print(f"meta-lr {meta_lr:g}: multipliers min {float(multipliers.min()):.4f} max {float(multipliers.max()):.4f}"
              f" mean |m-1| {float((multipliers - 1).abs().mean()):.4f}; val loss before fine-tuning round 1 "
              f"{first['val_loss_before']:.4f}, round {args.rounds} {last['val_loss_before']:.4f}; within the last "
              f"round's updates {last['val_loss_before']:.4f} -> {last['val_loss_after']:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
