"""One client's personalization cells trained one at a time against all together (core/multi_lora.py), on the
embedded model and data, in the benchmark's worker layout (one process, one thread per worker).

    .venv/bin/python benchmarks/many_adapters.py [--client 0] [--threads 1] [--grid | --fedl2p] [--pass-tokens N]
        [--no-bf16] [--base RUN/base/model]

Both paths run in this process and this run, so their ratio is robust to a noisy machine:
(a) the float32 matmul peak: best GFLOP/s of square matmuls (2 n^3 FLOPs each), and the bfloat16 one;
(b) the default profile's LoRA-shaped cells of one unseen client of ``intents`` on ``multilingual-e5-small``: lora,
    adalora, btlora (BayesTune search + fine-tune), fedp2eft-structure and fedp2eft (a generator whose outputs vary across
    ranks, as a trained one's do) at budgets 2, 4, 8, 16, each trained and scored on the client's test set;
    once with ``personalize`` + ``task.evaluate`` per cell in float32 (the old path, still the ``personalize``
    command's), once with ``personalize_many`` + ``evaluate_many`` (the benchmark's path) in float32, and once more
    in bf16 mixed precision (``precision: bf16``, what ``auto`` picks on a CPU with native bf16; left out with
    ``--no-bf16``);
(c) useful FLOP/s of each path: the matmul FLOPs of the real tokens (padding excluded) of training (search and
    fine-tunes: frozen weight forward + input gradient 4*in*out, LoRA 6*r*(in+out) per token and module) and of
    evaluation (2*in*out + 2*r*(in+out)), divided by the path's wall time, as a share of (a);
(d) whether the two paths score the same (correct answers per cell), and the process's peak resident memory (the
    batched path's: the one-at-a-time path holds one run).

``--grid`` trains the cells of learning-rate selection instead (lora, adalora and btlora x five scales x four budgets:
60 runs, five BayesTune searches); ``--pass-tokens`` sets ``PASS_TOKENS``, the size of a pass (memory against speed).
``--fedl2p`` times one client update of FedL2P's federated stage instead (the default profile's meta-training
settings, a fresh meta-net per budget): each budget's meta-net updated alone against all four in one pass per step,
and how far their validation losses and hypergradient norms differ; where the CPU has native bf16, the update again
in bf16, and the hypergradient at the same fine-tuned LoRAs in float32 and in bf16 (time, cosine, sign agreement).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import resource
import time

import torch

from fedp2eft.core import personalization
from fedp2eft.core.btlora import default_target_modules
from fedp2eft.core.device import native_bf16
from fedp2eft.core.generator import PSGenerator
from fedp2eft.core.methods import ClientContext, PersonalizeConfig, evaluate_many, features_for, generator_spec, \
    personalize, personalize_config, personalize_many
from fedp2eft.core.methods.fedl2p.meta_training import FedL2PConfig, fine_tune_at_rates, meta_update, \
    validation_hypergradient
from fedp2eft.core.methods.fedl2p.metanet import LRMetaNet, metanet_spec
from fedp2eft.core.personalization import validation_split
from fedp2eft.experiment import Setup
from fedp2eft.logs import quiet_third_party

METHODS = ("lora", "adalora", "btlora", "fedp2eft-structure", "fedp2eft")
BUDGETS = (2, 4, 8, 16)
GRID = (1.0, 3.0, 10.0, 30.0, 100.0)  # the default profile's learning-rate scales
CONFIG = personalize_config(dict(lora_lr=1e-3, scale_lr=0.1, adalora_lr=1e-2))  # the paper's rates x10


def matmul_peak(seconds: float = 2.0, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s over square matmuls of a few sizes in ``dtype``."""
    best = 0.0
    for n in (256, 512, 1024):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / 3:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start) / 1e9)
    return best


def real_tokens(task, examples: list[dict]) -> int:
    return int(task.collate(examples)["attention_mask"].sum())


def useful_flops(base, task, train, test, results, config: PersonalizeConfig) -> float:
    """Matmul FLOPs of the real tokens the cells' training and evaluation process (module docstring, (c))."""
    shapes = {name: (module.in_features, module.out_features) for name, module in base.named_modules()
              if name in set(default_target_modules(base))}
    frozen = sum(i * o for i, o in shapes.values())
    train_tokens, test_tokens = real_tokens(task, train), real_tokens(task, test)
    searches = {result.metrics.get("search_loss_last_epoch") for result in results} - {None}
    total = len(searches) * config.bayestune_epochs * train_tokens * sum(
        4 * i * o + 6 * config.max_rank * (i + o) for i, o in shapes.values())
    for result in results:
        lora = sum(r * sum(shapes[name]) for name, r in result.ranks.items())
        total += config.epochs * train_tokens * (4 * frozen + 6 * lora) + test_tokens * (2 * frozen + 2 * lora)
    return float(total)


def fedl2p_update(base, task, train) -> None:
    """(e): one FedL2P client update, the meta-nets of every budget alone and together (module docstring)."""
    config = FedL2PConfig(personalize=CONFIG)  # outer steps, Neumann terms, meta rates: the default profile's
    specs = [metanet_spec(base, CONFIG, "e5", budget) for budget in BUDGETS]
    features = features_for(base, task, train, specs[0])

    def fresh() -> list[LRMetaNet]:
        torch.manual_seed(0)
        return [LRMetaNet(spec, base_lr=CONFIG.lora_lr) for spec in specs]

    def update(metanets: list[LRMetaNet]) -> list[dict]:
        torch.manual_seed(1)  # the dropout masks' stream: each meta-net alone draws what the batch shares
        return meta_update(metanets, base, task, train, features, config, seed=0)

    start = time.perf_counter()
    alone = [update([metanet])[0] for metanet in fresh()]
    separate = time.perf_counter() - start
    start = time.perf_counter()
    together = update(fresh())
    batched = time.perf_counter() - start
    print(f"(e) FedL2P client update, meta-nets of r={list(BUDGETS)}: one at a time {separate:.1f} s, together "
          f"{batched:.1f} s, speed-up {separate / batched:.2f}x")
    differences = [abs(a[key] - b[key]) / abs(a[key]) for a, b in zip(alone, together)
                   for key in ("val_loss_before", "val_loss_after", "hypergrad_norm")]
    print(f"    largest relative difference of validation losses and hypergradient norms: {max(differences):.1e}")
    if not native_bf16(torch.device("cpu")):
        print("    (no native bf16 on this CPU: the bf16 hypergradient is left out)")
        return
    bf16 = dataclasses.replace(task, precision="bf16")
    start = time.perf_counter()
    torch.manual_seed(1)
    meta_update(fresh(), base, bf16, train, features, config, seed=0)
    rounded = time.perf_counter() - start
    print(f"    the same update (together) in bf16: {rounded:.1f} s, {batched / rounded:.2f}x float32's")
    hypergradient_precision(base, task, train, features, config, fresh())


def hypergradient_precision(base, task, train, features, config, metanets: list[LRMetaNet]) -> None:
    """(e), continued: FedL2P's hypergradient at the same fine-tuned LoRAs (every budget's, trained together in
    float32) computed in float32 and in bf16: time, and how far the direction moves (cosine, sign agreement)."""
    settings = config.personalize
    inner, validation = validation_split(train, config.validation_fraction, 0)
    rates = torch.stack([metanet.learning_rates(features) for metanet in metanets]).detach()
    model = fine_tune_at_rates(base, task, [metanet.spec for metanet in metanets], rates, inner, settings)
    batch = task.collate(random.Random(0).sample(inner, settings.batch_size))
    names = metanets[0].spec.module_names
    results = {}
    for precision in ("fp32", "bf16"):
        start = time.perf_counter()
        hypergrads = validation_hypergradient(model, dataclasses.replace(task, precision=precision), names,
                                              validation, batch, rates, config)[1]
        results[precision] = (time.perf_counter() - start, hypergrads)
    (slow, exact), (fast, rounded) = results["fp32"], results["bf16"]
    cosines = [float(torch.nn.functional.cosine_similarity(e, r, dim=0)) for e, r in zip(exact, rounded)]
    signs = [float((e.sign() == r.sign()).float().mean()) for e, r in zip(exact, rounded)]
    print(f"    hypergradient at the fine-tuned LoRAs: float32 {slow:.1f} s, bf16 {fast:.1f} s ({slow / fast:.2f}x); "
          f"bf16 vs float32 per budget: cosine {', '.join(f'{c:.4f}' for c in cosines)}, same sign "
          f"{', '.join(f'{x:.0%}' for x in signs)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", type=int, default=0, help="index of the unseen client")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the benchmark's workers use 1)")
    parser.add_argument("--grid", action="store_true", help="the cells of learning-rate selection instead")
    parser.add_argument("--fedl2p", action="store_true", help="time a FedL2P client update instead")
    parser.add_argument("--base", default="multilingual-e5-small",
                        help="a trained base-model folder (a run's base/model) instead of the embedded model with an "
                             "untrained head")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16 mixed-precision pass")
    parser.add_argument("--pass-tokens", type=int, default=personalization.PASS_TOKENS,
                        help="tokens one batched pass may hold (PASS_TOKENS)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    personalization.PASS_TOKENS = args.pass_tokens
    quiet_third_party()
    setup = Setup.from_config({"model": args.base, "dataset": "intents", "max_length": 64,
                               "dataset_options": {"languages": ["en", "zh-CN", "hi", "cy"],
                                                   "clients_per_language": 3, "test_size": 48},
                               "budgets": list(BUDGETS), "device": "cpu", "training": {}})
    base = setup.load_base_model("cpu", new_head_seed=0)  # the embedded model: an untrained head (timing only)
    client = setup.data.pool("unseen")[args.client]
    if args.fedl2p:
        fedl2p_update(base, setup.task, client.train)
        return
    torch.manual_seed(0)
    generator = PSGenerator(generator_spec(base, CONFIG, "e5"))
    with torch.no_grad():
        generator.net[-1].bias.uniform_(0.2, 1.5)
    cells = ([(method, budget, CONFIG.with_lr_scale(scale)) for method in ("lora", "adalora", "btlora")
              for scale in GRID for budget in BUDGETS] if args.grid
             else [(method, budget, CONFIG) for method in METHODS for budget in BUDGETS])
    peak = matmul_peak()
    paths = [("one at a time", "fp32"), ("all together", "fp32")] + [("all together", "bf16")] * (not args.no_bf16)
    peak_bf16 = matmul_peak(dtype=torch.bfloat16) if not args.no_bf16 else None
    print(f"(a) matmul peak, {args.threads} thread(s): {peak:.1f} GFLOP/s float32"
          + (f", {peak_bf16:.1f} GFLOP/s bf16" if peak_bf16 else ""))
    print(f"(b) client {client.client_id}: {len(client.train)} training, {len(client.test)} test sentences; "
          f"{len(cells)} cells ({', '.join(sorted({m for m, _, _ in cells}))} x r={list(BUDGETS)}"
          f"{f' x scales {GRID}' if args.grid else ''}); "
          f"{personalization.runs_per_pass(ClientContext(base, setup.task, client.train), 16)} runs per pass")

    timings, scores = {}, {}
    for path, precision in paths:
        task = dataclasses.replace(setup.task, precision=precision)
        context = ClientContext(base, task, client.train, {"psg": generator})
        start = time.perf_counter()
        if path == "one at a time":
            results = [personalize(method, context, budget=budget, config=config) for method, budget, config in cells]
            scored = [task.evaluate(result.model, client.test) for result in results]
        else:
            results = personalize_many(context, cells)
            scored = evaluate_many(task, results, client.test)
        name = f"{path}, {precision}"
        timings[name] = time.perf_counter() - start
        scores[name] = [score["correct"] for score in scored]
        rate = useful_flops(base, task, client.train, client.test, results, CONFIG) / timings[name] / 1e9
        shares = f"{rate / peak:.0%} of the float32 peak" + (f", {rate / peak_bf16:.0%} of the bf16 peak"
                                                            if precision == "bf16" else "")
        names = list(timings)
        speed = f", {timings[names[0]] / timings[name]:.2f}x the old path" if len(names) > 1 else ""
        print(f"    {name:>19}: {timings[name]:7.1f} s, {timings[name] / len(cells):5.2f} s per cell; "
              f"(c) useful {rate:5.1f} GFLOP/s = {shares}{speed}")
    old = scores[names[0]]
    for name in names[1:]:
        same = sum(a == b for a, b in zip(old, scores[name]))
        print(f"(d) {name}: cells with the old path's number of correct test answers: {same}/{len(cells)}")
        for (method, budget, config), a, b in zip(cells, old, scores[name]):
            if a != b:
                print(f"    differs: {method} r={budget} lr x{config.lora_lr / CONFIG.lora_lr:g}: {a} vs {b} correct")
    print(f"    peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB")


if __name__ == "__main__":
    main()
