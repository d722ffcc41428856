"""Does the PS generator learn language structure, and is the scale of its input what stops it?

The client features x (per-layer input mean and std) of different clients differ by a few percent around a large
common part (docs/discussion.md), so a generator that starts near zero can fit the common allocation long before
it can tell clients apart. This script trains the generator of a benchmark profile twice on the same base model,
seed and client sample: on the raw features (the method as published) and on features standardized with the
mean and standard deviation over the *seen* clients (``psg.training.standardize_features``: the engine gets them
in one round of sums of x and x^2 before round 1; the script sums the same client statistics directly). It prints
the training curve and, for the final generators, how much the rank maps of two clients overlap within one
language and across languages, for seen and unseen clients, next to the overlap of local BT-LoRA searches of the
same clients. Only training data are used; nothing is evaluated on test data.

    python docs/experiments/generator_structure.py --base results/default/base/model [--rounds 40] [--budgets 2 8]
    python docs/experiments/generator_structure.py --base results/default/base/model --local-epochs 2 10 --local-only

``--local-epochs`` with several values compares the local searches' structure at each number of stage-1 epochs
(the generators, unless ``--local-only``, train with the first): whether longer local training gives the targets
more per-client structure.

The client sampling is the engine's own (``fl.server_app.sample_clients``) and the average is FedAvg weighted by
example counts, what the engine's Flower strategy computes, run in one process without Flower: the stage's
arithmetic, not its transport, is what is measured.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from fedp2eft.benchmark.config import resolve
from fedp2eft.benchmark.report.rank_maps import rank_agreement
from fedp2eft.core.budget import select_top_ranks
from fedp2eft.core.generator_training import GeneratorTask, GeneratorTrainingConfig
from fedp2eft.core.methods import stage_named, settings_for_stage
from fedp2eft.core.personalization import PersonalizeConfig, features_for, generator_spec, new_btlora, \
    train_btlora
from fedp2eft.experiment import Setup
from fedp2eft.fl.server_app import sample_clients
from fedp2eft.logs import quiet_third_party


def agreement(allocations: list[tuple[int, str, dict]]) -> str:
    found = rank_agreement(allocations) or {}
    return (f"same language {found.get('client_pairs_same_language', float('nan')):.3f}, "
            f"different languages {found.get('client_pairs_different_language', float('nan')):.3f}")


def fedavg(updates: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """The example-weighted mean of the clients' weights."""
    total = sum(count for _, count in updates)
    return {key: sum(weights[key] * (count / total) for weights, count in updates) for key in updates[0][0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="a trained base model folder (e.g. results/default/base/model)")
    parser.add_argument("--config", default="default", help="benchmark profile whose data and psg settings to use")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scale", type=float, default=None,
                        help="stage-1 learning-rate scale (default: the profile's psg.lr_scale, when it is a number)")
    parser.add_argument("--local-epochs", type=int, nargs="+", default=None,
                        help="stage-1 local epochs of the local searches (default: the profile's psg local_epochs)")
    parser.add_argument("--local-only", action="store_true", help="only the local searches, no generator training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_third_party()
    config = resolve(args.config, [])
    setup = Setup(args.base, config["dataset"], dict(config["dataset_options"]), config["max_length"])
    base = setup.load_base_model()
    scale = args.scale if args.scale is not None else float(config["psg"]["lr_scale"])
    personalize = settings_for_stage(config["personalize"], stage_named("psg"), scale)
    personal = PersonalizeConfig.from_dict(personalize)
    training = GeneratorTrainingConfig.from_dict({**config["psg"]["training"], "seed": args.seed,
                                                  "personalize": personalize, "total_rounds": args.rounds})
    epochs = args.local_epochs or [training.local_epochs]
    training = replace(training, local_epochs=epochs[0])
    clients = setup.data.seen + setup.data.unseen
    spec = generator_spec(base, personal, args.base)
    raw = {c.client_id: features_for(base, setup.task, c.train, spec).float() for c in clients}
    seen = torch.stack([raw[c.client_id] for c in setup.data.seen])
    print(f"features: {seen.shape[1]} values; across seen clients the median relative spread (std / |mean|) is "
          f"{float((seen.std(0) / seen.mean(0).abs().clamp(min=1e-12)).median()):.3f}")

    # local BT-LoRA searches (the stage-1 targets' structure without the generator), at the generator's stage-1 rates
    maps = {}
    for count in epochs:
        local = {}
        for client in clients:
            model = new_btlora(base, personal)
            train_btlora(model, setup.task, client.train, personal, count)
            local[client.client_id] = model.scales().detach().float()
        maps[f"local search, {count} epochs"] = local
        targets = torch.stack(list(local.values()))
        print(f"local search, {count} epochs: mean lambda {float(targets.mean()):.3f}, std across a client's entries "
              f"{float(targets.std(1).median()):.3f}, across clients {float(targets.std(0).median()):.3f} (medians)")
    variants = {} if args.local_only else {
        name: GeneratorTask(base, setup.task, setup.data.seen, replace(training, standardize_features=standardized),
                            args.base)
        for name, standardized in (("raw features", False), ("standardized features", True))}
    for name, task in variants.items():
        start = time.perf_counter()
        if task.needs_statistics:  # what the engine's statistics round computes, summed here directly
            shares = [task.client_statistics(i) for i in range(task.num_clients())]
            weights = task.initial_weights_from({key: sum(share[key] for share in shares) for key in shares[0]})
        else:
            weights = task.initial_weights()
        print(f"\n{name}: round, mean lambda, stage-1 loss")
        for server_round in range(1, args.rounds + 1):
            sampled = sample_clients(list(range(task.num_clients())), config["psg"]["clients_per_round"], args.seed,
                                     server_round)
            updates = [task.client_update(weights, index, server_round) for index in sampled]
            weights = fedavg([(u.weights, u.num_examples) for u in updates])
            if server_round % 5 == 0 or server_round == 1:
                print(f"{server_round:5d} {np.mean([u.metrics['mean_lambda'] for u in updates]):8.3f} "
                      f"{np.mean([u.metrics['stage1_loss'] for u in updates]):8.3f}")
        generator = task.new_generator()
        generator.load_state_dict(weights)
        with torch.no_grad():
            maps[name] = {c.client_id: generator(raw[c.client_id]) for c in clients}
        outputs = torch.stack(list(maps[name].values()))
        print(f"({time.perf_counter() - start:.0f} s) output std across clients {float(outputs.std(0).median()):.4f}, "
              f"across entries {float(outputs.std(1).median()):.4f} (medians)")
    modules = list(spec.module_names)
    print("\nrank-map overlap of two clients (1 = identical allocation)")
    for budget in args.budgets:
        for pool, members in (("seen", setup.data.seen), ("unseen", setup.data.unseen)):
            for name, by_client in maps.items():
                allocations = [(0, c.language, select_top_ranks(by_client[c.client_id], modules,
                                                                personal.max_rank, budget).ranks) for c in members]
                print(f"r={budget} {pool:6s} {name:26s} {agreement(allocations)}")


if __name__ == "__main__":
    main()
