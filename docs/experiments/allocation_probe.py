"""Where FedP²EFT's small-budget rank maps put their ranks, and what that costs against uniform LoRA.

Reads a finished benchmark run (``--run``, default results/default) and changes nothing in it.

(1) From the run's own rows (``personalize.jsonl``; no computation): for every method that reports ranks, the
    share of the kept ranks in each module *type* of a transformer block (attention query/key/value/output, FFN up
    and down) at each budget, pooled over clients and seeds, next to each type's output width.
(2) From each seed's PS generator on every client's features (training data only): the generator's mean lambda
    per module type, over all R entries of a module, kept or not. BayesTune's significance prior divides the L1
    norm of a B column's change by lambda; that norm sums over the module's outputs, so the prior's equilibrium
    (about 10·sqrt of the norm) grows with the output width.
(3) An explanation, not a selection (nothing here chooses a setting): at each budget where FedP²EFT's maps put
    ``--fill`` or more of their ranks into one module type, two probes, trained and scored on every client of the
    run exactly as the run's cells (same seed, data and artifacts), both at the learning-rate scale the run chose
    for uniform LoRA (no selection of their own): LoRA restricted to that type with the same total ranks (budget x
    all modules / modules of the type, per module), and ``fedp2eft-structure`` (the generator's rank map, every
    lambda 1). Each is paired with the run's uniform LoRA and ``fedp2eft-structure`` rows at the same budget:
    bootstrap over clients (seeds pooled, stratified by language), as in the report. The first client's uniform
    LoRA cell is recomputed and must equal the run's row.

    python docs/experiments/allocation_probe.py [--run results/default] [--fill 0.9]

Part (3) runs in the benchmark's own worker pool (the run's ``workers`` setting).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from fedp2eft.benchmark.report.records import client_units
from fedp2eft.benchmark.report.stats import paired_bootstrap
from fedp2eft.benchmark.cells import personalize_cell, seeded_personalize_config
from fedp2eft.benchmark.run_folder import finished_artifact, finished_base, read_jsonl, run_config, task_config
from fedp2eft.benchmark.lr_selection import read_chosen_scales
from fedp2eft.benchmark.workers import WorkerPool, worker_artifacts, worker_model
from fedp2eft.core.btlora import resolve_target_modules
from fedp2eft.core.methods import ClientContext, stage_named
from fedp2eft.core.pfl import apply_overlay
from fedp2eft.core.personalization import features_for
from fedp2eft.experiment import Setup
from fedp2eft.logs import quiet_third_party

BLOCK = re.compile(r"layer\.\d+\.(.+)$")


def module_type(name: str) -> str:
    """``encoder.layer.3.attention.self.query`` -> ``attention.self.query``; names outside a block stay whole."""
    match = BLOCK.search(name)
    return match.group(1) if match else name


def type_shares(records: list[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """(method, budget) -> module type -> share of the kept ranks, pooled over every row."""
    totals: dict[tuple[str, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for record in records:
        for row in record["rows"]:
            for name, rank in row.get("ranks", {}).items():
                totals[row["method"], row["budget"]][module_type(name)] += rank
    return {key: {kind: value / sum(by_type.values()) for kind, value in by_type.items()}
            for key, by_type in totals.items()}


def _cell(config: dict, seed: int, pool: str, index: int, method: str, rank: int, kind: str | None, scale: float,
          label: str, budget: int, artifacts: dict[str, str]) -> dict:
    """The run's cell of ``method`` for one client (in a benchmark worker, as the run computes its cells) at rank
    budget ``rank`` and learning-rate scale ``scale``, its LoRA only in the modules of type ``kind`` (all when
    None); reported as ``label`` at ``budget``."""
    setup, base = worker_model()
    client = setup.data.pool(pool)[index]
    personal = seeded_personalize_config(config, seed)
    if kind is not None:
        personal = replace(personal, target_modules=[rf"layer\.\d+\.{re.escape(kind)}"])
    context = ClientContext(base, setup.task, client.train, worker_artifacts(artifacts))
    with apply_overlay(base, setup.personal_overlay(base, pool, index)):
        row, _ = personalize_cell(context, client.test, method, rank, personal, scale)
    return {"seed": seed, "pool": pool, "client": client.client_id, "language": client.language,
            "rows": [{**row, "method": label, "budget": budget}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("results/full"),
                        help="a finished run with fedp2eft-structure rows (the full profile)")
    parser.add_argument("--fill", type=float, default=0.9, help="share of one module type that triggers part (3)")
    args = parser.parse_args()
    quiet_third_party()
    config = run_config(args.run)
    base_model = finished_base(config, args.run)
    records = read_jsonl(args.run / "personalize.jsonl")
    setup = Setup.from_config(task_config(config, base_model, {}))
    base = setup.load_base_model()
    modules = resolve_target_modules(base, config["personalize"]["target_modules"])
    width = {module_type(name): base.get_submodule(name).out_features for name in modules}
    count = defaultdict(int)
    for name in modules:
        count[module_type(name)] += 1
    kinds = sorted(width)

    print("(1) share of kept ranks per module type (output width, modules)")
    print(f"{'method':<20}{'r':>4}" + "".join(f"{kind:>24}" for kind in kinds))
    print(f"{'':<24}" + "".join(f"{f'{width[k]}, {count[k]}':>24}" for k in kinds))
    shares = type_shares(records)
    for method, budget in sorted(shares):
        print(f"{method:<20}{budget:>4}" + "".join(f"{shares[method, budget].get(k, 0.0):>24.2f}" for k in kinds))

    print("\n(2) the generator's mean lambda per module type (all entries, every client), per seed")
    psg = stage_named("psg")
    generator_paths = {seed: finished_artifact(config, args.run, psg, seed) for seed in config["seeds"]}
    personal = seeded_personalize_config(config, config["seeds"][0])
    clients = setup.data.seen + setup.data.unseen
    for seed in config["seeds"]:
        generator = psg.load(generator_paths[seed], base, personal, base_model)
        sums = defaultdict(float)
        for client in clients:
            with torch.no_grad():
                output = generator(features_for(base, setup.task, client.train, generator.spec)).view(len(modules), -1)
            for name, values in zip(generator.spec.module_names, output):
                sums[module_type(name)] += float(values.mean()) / (count[module_type(name)] * len(clients))
        print(f"seed {seed}: " + ", ".join(f"{k} {sums[k]:.3f}" for k in kinds))

    scales = read_chosen_scales(args.run / "selection.json", ["lora"], config["budgets"])["lora"]
    probes = [(budget, kind) for (method, budget), by_type in sorted(shares.items()) if method == "fedp2eft"
              for kind, share in by_type.items() if share >= args.fill]
    index_of = {(pool, c.client_id): i for pool in config["pools"] for i, c in enumerate(setup.data.pool(pool))}
    jobs = []
    for budget, kind in probes:
        for r in records:
            client = (r["seed"], r["pool"], index_of[r["pool"], r["client"]])
            jobs.append((*client, "lora", budget * len(modules) // count[kind], kind, scales[budget], f"lora-{kind}",
                         budget, {}))
            jobs.append((*client, "fedp2eft-structure", budget, None, scales[budget], "structure-at-lora-scale",
                         budget, {psg.name: str(generator_paths[r["seed"]])}))
    first = records[0]
    check = (first["seed"], first["pool"], index_of[first["pool"], first["client"]], "lora", probes[0][0], None,
             scales[probes[0][0]], "lora", probes[0][0], {}) if probes else None
    print(f"\n(3) LoRA restricted to one module type at the same total ranks, and FedP²EFT's rank map (lambda 1) at "
          f"LoRA's learning-rate scale: {len(jobs)} cells")
    with WorkerPool(config, base_model) as pool:
        extra = [future.result() for future in [pool.submit(_cell, *job) for job in jobs]]
        recomputed = pool.submit(_cell, *check).result() if check else None
    if recomputed:
        published = next(row for row in first["rows"] if (row["method"], row["budget"]) == ("lora", probes[0][0]))
        mine = recomputed["rows"][0]
        print(f"reproduction: the run's LoRA r={probes[0][0]} cell of {first['client']} (seed {first['seed']}) "
              f"recomputed {mine['correct']}/{mine['count']}, published {published['correct']}/{published['count']}")
    units = client_units(records + extra)
    for budget, kind in probes:
        pairs = [(f"lora-{kind}", "lora"), (f"lora-{kind}", "fedp2eft-structure"), ("structure-at-lora-scale", "lora"),
                 ("structure-at-lora-scale", "fedp2eft-structure"), ("structure-at-lora-scale", f"lora-{kind}")]
        print(f"r={budget}: lora-{kind} = rank {budget * len(modules) // count[kind]} in each of the {count[kind]} "
              f"{kind} modules only; both probes at LoRA's scale x{scales[budget]:g}")
        for pool_name in config["pools"]:
            for ours, other in pairs:
                interval = paired_bootstrap(units[pool_name, ours, budget], units[pool_name, other, budget])
                print(f"  {pool_name:<7}{ours:>26} minus {other:<24}{100 * interval.mean:+6.1f} "
                      f"[{100 * interval.low:+.1f}, {100 * interval.high:+.1f}]")


if __name__ == "__main__":
    main()
