"""Does FedL2P's hypergradient point downhill? (docs/discussion.md, "FedL2P: why its learned learning rates stay at 1")

FedL2P moves its per-tensor learning rates along the implicit-function hypergradient of the validation loss, taken
as if the fine-tuned LoRA were a fixed point of one SGD step (``implicit_hypergradient`` with ``sgd_step_map``).
The fine-tune it differentiates is in fact two epochs of AdamW from a fixed init. This probe measures, for a few
seen clients of a finished run, what the validation loss really does as each tensor's rate changes:

- the IFT hypergradient g at uniform LoRA's rates (every multiplier 1: where FedL2P starts), exactly as
  ``meta_update`` computes it (same split, batch and Neumann settings);
- the finite-difference gradient of the same validation loss, each tensor's rate raised by ``--eps`` (relative)
  in its own fine-tune, all fine-tunes of a client trained together (``MultiLoRAModel``: each equals its own run);
- their cosine and sign agreement, and the loss after a step of relative size ``--eps`` along -g (what a meta-step
  does) and along minus the finite-difference gradient (what a step that knew the true slope would do);
- the floor under all of these: the same unperturbed fine-tune placed at several positions of the batched passes
  (other neighbours, other pass sizes), whose validation losses differ only by float rounding that 2 epochs of
  AdamW amplify.

Only *training* data of seen clients are read (FedL2P's own inner-train/validation split); no test data.

    python docs/experiments/fedl2p_hypergradient.py --run results/default-s12b [--clients 3] [--budget 2] [--eps 0.5]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from fedp2eft.benchmark.lr_selection import stage_rates_of_run
from fedp2eft.benchmark.run_folder import finished_run_model
from fedp2eft.core.methods import stage_named
from fedp2eft.core.methods.fedl2p.meta_training import FedL2PConfig, fine_tune_at_rates, loss_and_gradient, \
    stacked_tensors, validation_hypergradient
from fedp2eft.core.methods.fedl2p.metanet import metanet_spec
from fedp2eft.core.personalization import ClientContext, PersonalizeConfig, runs_per_pass, validation_split
from fedp2eft.logs import quiet_third_party


def validation_losses(base, task, spec, rate_sets: list[torch.Tensor], inner, validation, settings) -> list[float]:
    """The validation loss after fine-tuning a fresh LoRA (same init) on ``inner`` at each set of per-tensor rates,
    the fine-tunes trained together, as many per pass as fit."""
    per_pass = runs_per_pass(ClientContext(base, task, inner), settings.batch_size)
    losses = []
    for start in range(0, len(rate_sets), per_pass):
        chunk = rate_sets[start:start + per_pass]
        model = fine_tune_at_rates(base, task, [spec] * len(chunk), chunk, inner, settings)
        tensors = stacked_tensors(model, spec.module_names)
        losses += loss_and_gradient(model, task, validation, tensors, settings.batch_size)[0]
    return losses


def ift_hypergradient(base, task, spec, rates: torch.Tensor, inner, validation, config: FedL2PConfig,
                      rng: random.Random) -> tuple[float, torch.Tensor]:
    """The validation loss and FedL2P's hypergradient with respect to the per-tensor rates, as ``meta_update``."""
    settings = config.personalize
    model = fine_tune_at_rates(base, task, [spec], [rates], inner, settings)
    batch = task.collate(rng.sample(inner, min(settings.batch_size, len(inner))))
    loss, hypergrad = validation_hypergradient(model, task, spec.module_names, validation, batch, rates.view(1, -1),
                                               config)
    return loss[0], hypergrad.view(-1).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run of the intent benchmark")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=3, help="seen clients, one per language first")
    parser.add_argument("--budget", type=int, default=2)
    parser.add_argument("--eps", type=float, default=0.5, help="relative change of a rate for the finite differences")
    args = parser.parse_args()
    quiet_third_party()
    torch.set_num_threads(args.threads)
    config, setup, base = finished_run_model(args.run)
    scale, personalize = stage_rates_of_run(config, args.run, stage_named("fedl2p"))
    fedl2p = FedL2PConfig.from_dict({**config["fedl2p"]["training"], "personalize": personalize})
    settings: PersonalizeConfig = fedl2p.personalize
    spec = metanet_spec(base, settings, setup.model, args.budget)
    rates = torch.full((spec.num_outputs,), settings.lora_lr)
    seen = setup.data.pool("seen")
    per_language = config["dataset_options"]["clients_per_language"]
    order = sorted(range(len(seen)), key=lambda client: (client % per_language, client))[:args.clients]
    print(f"base model {setup.model}; r={args.budget}; {spec.num_outputs} LoRA tensors at uniform LoRA's rate "
          f"{settings.lora_lr:g} (scale x{scale:g}); eps {args.eps:g}")
    for index in order:
        started = time.perf_counter()
        client = seen[index]
        seed = fedl2p.seed * 100_003 + index  # the split and batch FedL2PTask.client_update draws for this client
        inner, validation = validation_split(client.train, fedl2p.validation_fraction, seed)
        loss, hypergrad = ift_hypergradient(base, setup.task, spec, rates, inner, validation, fedl2p,
                                            random.Random(seed))
        raised = [rates.clone() for _ in range(spec.num_outputs)]
        for tensor, perturbed in enumerate(raised):
            perturbed[tensor] *= 1 + args.eps
        along_g = rates * (1 - args.eps * hypergrad * rates / (hypergrad * rates).abs().max())
        # the unperturbed rates at several places of the list: the same fine-tune in other passes and neighbours,
        # whose spread is how far the loss moves with no change of rate at all (the floor of any difference)
        places = [0, len(raised) // 3, 2 * len(raised) // 3, len(raised)]
        rate_sets = [*raised, along_g]
        for place in reversed(places):
            rate_sets.insert(place, rates)
        losses = validation_losses(base, setup.task, spec, rate_sets, inner, validation, settings)
        at_base = [losses[place + offset] for offset, place in enumerate(places)]
        rest = [loss for index, loss in enumerate(losses) if index not in {p + o for o, p in enumerate(places)}]
        base_loss, floor = sum(at_base) / len(at_base), max(at_base) - min(at_base)
        finite = torch.tensor(rest[:-1]) - base_loss
        fd_grad = finite / (args.eps * rates)  # d loss / d rate, forward differences
        direction = fd_grad * rates  # in log-rate units, as the step along -g
        along_fd = rates * (1 - args.eps * direction / direction.abs().max())
        (loss_fd,) = validation_losses(base, setup.task, spec, [along_fd], inner, validation, settings)
        cosine = float(torch.nn.functional.cosine_similarity(hypergrad, fd_grad, dim=0))
        agree = float(((hypergrad > 0) == (fd_grad > 0)).float().mean())
        print(f"client {client.client_id}: val loss {base_loss:.4f} (alone, in the IFT pass: {loss:.4f}); the same "
              f"rates in {len(places)} places of the batch span {floor:.4f}; a rate raised by {args.eps:.0%} moves it "
              f"by {float(finite.abs().median()):.4f} (median over tensors; {int((finite.abs() > floor).sum())} of "
              f"{len(finite)} beyond the span); cosine(IFT, finite differences) {cosine:+.3f}, same sign "
              f"{agree:.0%}; a step along -g moves it {rest[-1] - base_loss:+.4f}, along minus the finite-difference "
              f"gradient {loss_fd - base_loss:+.4f} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
