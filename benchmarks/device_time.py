"""Personalization and federated-round speed on a device, in the paper's setting or the intent benchmark's.

``--setting paper``: the paper's XNLI client (docs/method.md, "Benchmark regime"; `paper` profile): 100 training
and 25 test premise/hypothesis pairs, at most 128 tokens, batch 32, 2 epochs, max rank R=32, budget r=8, on a model
of mBERT's shape (vocabulary 119547, 12 layers, hidden 768).

``--setting default``: a client of the intent benchmark's complete protocol (the `full` profile, read for every
setting and count; the main job `default` is a subset of its cells): 48 training and 48 test intent-length sentences (2-12 words, as the embedded intents
average 9 tokens), at most 64 tokens, the profile's personalization settings and budgets, on a model of the
embedded multilingual-e5-small's shape. It also times one client update of each federated stage (base model,
PS generator, FedL2P) through the tasks the Flower apps run, and with ``--estimate`` prices the profile's whole
three-seed job on this device from those unit times (below).

Models have random weights, built from a config, so nothing is downloaded: the time of a step does not depend on
the weights. Texts are random words of a synthetic word-level tokenizer (one token per word), lengths drawn so
that batches carry padding as real ones do. FedP²EFT uses a freshly initialised PS generator, FedL2P fresh
meta-nets, both of the right layout and on the device (their outputs decide ranks and learning rates, not the
time).

A *client cell* is what the benchmark's stage 3 does for one client: the base model evaluated, then every method
of ``--methods`` at every budget of the setting, each trained through ``personalize()`` unmodified (the one
training loop, bf16 autocast on a GPU that supports it) and evaluated, on one client context (features, generator
output and BayesTune search computed once, as in the benchmark). Cells are timed ``--repeats`` times after one
warm-up cell, each on a fresh context. With ``--baseline-cpu`` one cell also runs on this machine's CPU, so the
printed speed-up compares two devices of one machine in one run. With ``--processes 1 4 8`` it measures clients
personalized at the same time on one device (the benchmark's ``workers``): that many processes each build the
model, warm up, wait for a common start and run ``--repeats`` cells; the throughput is all their cells over the
time from that start to the last one's end.

``--estimate`` (default setting) adds up the full profile's job from the profile's counts: stage 3 = seeds x pools x
clients cells, selection = its clients x grid x a cell of the methods with a learning rate to select (on all of a
client's data, so an upper bound for its 80%), each spread over the largest measured process count; each federated
round = clients-per-round updates spread over that many processes at the measured speed-up for that count, plus
Flower's per-round overhead as measured on the CPU machine (docs/federation.md). Not counted: Ray's start and each
actor's model load, once per federated run.

    python benchmarks/device_time.py [--setting paper|default] [--device auto] [--methods ...] [--repeats 3]
                                     [--baseline-cpu] [--processes 1 4 8] [--threads N] [--estimate]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, PreTrainedTokenizerFast

from fedp2eft.core.base_training import BaseModelTask, BaseTrainingConfig
from fedp2eft.core.device import resolve_device
from fedp2eft.benchmark.config import load_profile
from fedp2eft.core.generator import PSGenerator
from fedp2eft.core.generator_training import GeneratorTask, GeneratorTrainingConfig
from fedp2eft.core.methods import ClientContext, PersonalizeConfig, generator_spec, method_spec, personalize, \
    personalize_config
from fedp2eft.core.methods.fedl2p.meta_training import FedL2PConfig, FedL2PTask
from fedp2eft.core.methods.fedl2p.metanet import LRMetaNet, metanet_spec
from fedp2eft.core.modeling import classifier_from_config
from fedp2eft.core.tasks import ClassificationTask
from fedp2eft.data.types import ClientData
from fedp2eft.errors import config_from_mapping

WORDS = [f"w{i}" for i in range(5000)]
FLOWER_ROUND_OVERHEAD_S = 0.2  # Flower/Ray per round, measured on the CPU machine (docs/federation.md)
MODEL_NAME = "random-weights"
PAPER_METHODS = ["lora", "adalora", "btlora", "fedl2p", "fedp2eft"]


@dataclass(frozen=True)
class Setting:
    """One client's shape: the model, the data and the personalization settings."""

    description: str
    model: dict
    labels: int
    train: int
    test: int
    words: tuple[int, int]
    pair_words: tuple[int, int] | None
    max_length: int
    budgets: tuple[int, ...]
    config: PersonalizeConfig


def profile() -> dict:
    """The full protocol (three seeds, every method and budget): the job whose time ``--estimate`` adds up; the main
    job is a subset of its cells."""
    return load_profile("full")


def setting(name: str) -> Setting:
    if name == "paper":
        return Setting("mBERT-shaped; 100 train / 25 test pairs, batch 32",
                       {"vocab_size": 119547, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                        "intermediate_size": 3072, "max_position_embeddings": 512},
                       3, 100, 25, (20, 90), (5, 30), 128, (8,), PersonalizeConfig(batch_size=32))
    default = profile()
    return Setting(f"multilingual-e5-small-shaped; {default['dataset']} client, 48 train / 48 test sentences, "
                   f"batch {default['personalize']['batch_size']}",
                   {"vocab_size": 250037, "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 1536, "max_position_embeddings": 512},
                   28, 48, default["dataset_options"]["test_size"], (2, 12), None, default["max_length"],
                   tuple(default["budgets"]), personalize_config(default["personalize"]))


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``WORDS`` with BERT's single and pair templates."""
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def examples(shape: Setting, count: int, seed: int) -> list[dict]:
    """Random texts of the setting's word counts (and pairs, if it has them); labels uniform."""
    rng = random.Random(seed)

    def text(words: tuple[int, int]) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(*words)))

    rows = []
    for _ in range(count):
        row = {"text": text(shape.words), "label": rng.randrange(shape.labels)}
        if shape.pair_words:
            row["text_pair"] = text(shape.pair_words)
        rows.append(row)
    return rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device):
    """``function()``'s result and its seconds, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def client_context(base: torch.nn.Module, task: ClassificationTask, shape: Setting, train: list[dict]) -> ClientContext:
    """A fresh context per cell: nothing shared between repeats (features and searches are recomputed)."""
    device = next(base.parameters()).device
    generator = PSGenerator(generator_spec(base, shape.config, MODEL_NAME)).to(device)
    metanets = {budget: LRMetaNet(metanet_spec(base, shape.config, MODEL_NAME, budget),
                                  base_lr=shape.config.lora_lr).to(device) for budget in shape.budgets}
    return ClientContext(base, task, train, {"psg": generator, "fedl2p": metanets})


def run_cell(base, task, shape: Setting, methods: list[str], train, test, device) -> dict:
    """One client cell (the base model's evaluation first); seconds of every (method, budget) run and its
    evaluation, steps, and the cell's total."""
    context = client_context(base, task, shape, train)
    start = time.perf_counter()
    timed(lambda: task.evaluate(base, test), device)
    runs = {}
    for method in methods:
        for budget in shape.budgets:
            result, seconds = timed(lambda: personalize(method, context, budget=budget, config=shape.config), device)
            _, evaluation = timed(lambda: task.evaluate(result.model, test), device)
            runs[method, budget] = (seconds, evaluation, int(result.metrics["steps"]))
    return {"runs": runs, "total": time.perf_counter() - start}


def setup(args: argparse.Namespace):
    """The setting, the model on the device, the task and one client's data."""
    shape = setting(args.setting)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = BertConfig(**{**shape.model, "num_hidden_layers": args.layers or shape.model["num_hidden_layers"]})
    labels = [f"label{i}" for i in range(shape.labels)]
    base = classifier_from_config(config, labels).eval().to(device)
    task = ClassificationTask(word_tokenizer(), labels, max_length=shape.max_length)
    return shape, device, base, task, examples(shape, shape.train, seed=1), examples(shape, shape.test, seed=2)


def federated_updates(base, task, shape: Setting, device, repeats: int) -> dict[str, float]:
    """Median seconds of one client update of each federated stage of the full profile, through the tasks the
    Flower apps run (after one warm-up update; rounds after the first, so features are already cached)."""
    default = profile()
    clients = [ClientData(f"c{i}", "xx", examples(shape, shape.train, seed=10 + i), []) for i in range(2)]
    personal = default["personalize"]
    tasks = {
        "base": BaseModelTask(copy.deepcopy(base), task, clients,
                              config_from_mapping(BaseTrainingConfig, default["base"]["training"], "base.training")),
        "psg": GeneratorTask(base, task, clients, GeneratorTrainingConfig.from_dict(
            {**default["psg"]["training"], "personalize": personal}), MODEL_NAME),
        "fedl2p": FedL2PTask(base, task, clients, FedL2PConfig.from_dict(
            {**default["fedl2p"]["training"], "personalize": personal}), MODEL_NAME, shape.budgets),
    }
    seconds = {}
    for stage, federated in tasks.items():
        weights = federated.initial_weights()
        times = [timed(lambda: federated.client_update(weights, 0, server_round), device)[1]
                 for server_round in range(1, repeats + 2)][1:]
        seconds[stage] = statistics.median(times)
    return seconds


def estimate(cell: float, selection_cell: float, updates: dict[str, float], speedups: dict[int, float]) -> None:
    """The full profile's job on this device from the measured unit times (see the module docstring)."""
    default = profile()
    workers = max(speedups)
    clients = len(default["dataset_options"]["languages"]) * default["dataset_options"]["clients_per_language"]
    seeds, pools = len(default["seeds"]), len(default["pools"])
    select = default["selection"]
    selection_clients = len(default["dataset_options"]["languages"]) * select["clients_per_language"]

    def speedup(count: int) -> float:
        """The measured speed-up of the largest process count that ``count`` clients can fill."""
        measured = [k for k in speedups if k <= count]
        return speedups[max(measured)] if measured else 1.0

    def federated(stage: str, runs: int) -> float:
        section = default[stage]
        per_round = section["clients_per_round"] * updates[stage] / speedup(section["clients_per_round"])
        return runs * section["rounds"] * (per_round + FLOWER_ROUND_OVERHEAD_S)

    stages = {
        "base": federated("base", 1),
        "select": selection_clients * len(select["grid"]) * selection_cell / speedups[workers],
        "psg": federated("psg", seeds),
        "fedl2p": federated("fedl2p", seeds),
        "personalize": seeds * pools * clients * cell / speedups[workers],
    }
    print(f"\nthe full profile's job on this device ({workers} processes for stage 3 and selection; "
          f"Ray start and actor model loads not counted):")
    for stage, seconds in stages.items():
        print(f"  {stage:<12}{seconds / 60:>7.1f} min")
    print(f"  {'total':<12}{sum(stages.values()) / 60:>7.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=["paper", "default"], default="paper")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="default: the paper setting's five methods, or the full profile's methods")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-cpu", action="store_true", help="also time one cell on the CPU")
    parser.add_argument("--layers", type=int, default=None, help="encoder layers (default: the setting's 12)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: torch's); 1 on the CPU machine prices its workers")
    parser.add_argument("--processes", type=int, nargs="*", default=[],
                        help="also time this many concurrent clients on the device, per value")
    parser.add_argument("--estimate", action="store_true",
                        help="price the full profile's job (default setting)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one of the concurrent clients
    args = parser.parse_args()
    if args.estimate and (args.setting != "default" or not args.processes):
        parser.error("--estimate needs --setting default and --processes (at least 1)")
    args.methods = args.methods or (profile()["methods"] if args.setting == "default" else PAPER_METHODS)
    if args.child:
        return concurrent_child(args)
    shape, device, base, task, train, test = setup(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    tokens = sum(int(task.collate([row])["attention_mask"].sum()) for row in train) * shape.config.epochs
    print(f"device: {name}; {shape.description}; {shape.config.epochs} epochs, R={shape.config.max_rank}, "
          f"budgets {list(shape.budgets)}; {tokens} real training tokens per run")
    cells = [run_cell(base, task, shape, args.methods, train, test, device) for _ in range(args.repeats + 1)][1:]
    print(f"{'method':<10}{'r':>4}{'run s':>9}{'steps':>7}{'s/step':>9}{'tokens/s':>10}{'eval s':>9}")
    for method, budget in cells[0]["runs"]:
        seconds = statistics.median(cell["runs"][method, budget][0] for cell in cells)
        evaluation = statistics.median(cell["runs"][method, budget][1] for cell in cells)
        steps = cells[0]["runs"][method, budget][2]
        print(f"{method:<10}{budget:>4}{seconds:>9.3f}{steps:>7}{seconds / steps:>9.4f}{tokens / seconds:>10.0f}"
              f"{evaluation:>9.3f}")
    cell = statistics.median(c["total"] for c in cells)
    print(f"client cell ({len(args.methods)} methods x {len(shape.budgets)} budgets, evaluations and the base "
          f"model's included): {cell:.2f} s")
    if args.baseline_cpu and device.type != "cpu":
        cpu_base = copy.deepcopy(base).to("cpu")
        cpu_cell = run_cell(cpu_base, task, shape, args.methods, train, test, torch.device("cpu"))["total"]
        print(f"the same cell on the CPU ({torch.get_num_threads()} threads): {cpu_cell:.2f} s; {name} is "
              f"{cpu_cell / cell:.1f}x faster")
    if args.estimate:
        updates = federated_updates(base, task, shape, device, args.repeats)
        print("one client update per federated round: " + ", ".join(f"{k} {v:.2f} s" for k, v in updates.items()))
    throughput = {count: concurrent(count, args) for count in args.processes}
    for count, cells_per_second in throughput.items():
        print(f"{count} clients at once on {name}: {cells_per_second:.3f} cells/s "
              f"({cells_per_second * cell:.1f}x one client's rate)")
    if args.estimate:
        selected = [m for m in args.methods if method_spec(m).lr_field is not None]
        selection_cell = statistics.median(
            sum(c["runs"][m, b][0] + c["runs"][m, b][1] for m in selected for b in shape.budgets) for c in cells)
        speedups = {count: rate * cell for count, rate in throughput.items()}
        estimate(cell, selection_cell, updates, speedups)


def concurrent(count: int, args: argparse.Namespace) -> float:
    """Cells per second of ``count`` processes personalizing at once, timed from a common start: each child
    builds its model and warms up, says so, and waits for the go."""
    command = [sys.executable, __file__, "--setting", args.setting, "--device", args.device, "--repeats",
               str(args.repeats), "--methods", *args.methods, "--child"]
    for option, value in (("--layers", args.layers), ("--threads", args.threads)):
        command += [option, str(value)] if value else []
    children = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for _ in range(count)]
    for child in children:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("a concurrent client failed before its warm-up ended")
    start = time.time()
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    ends = [float(child.communicate()[0].split()[-1]) for child in children]
    return count * args.repeats / (max(ends) - start)


def concurrent_child(args: argparse.Namespace) -> None:
    """Build, warm up, say ready, wait for the go, run ``--repeats`` cells; print the end time."""
    shape, device, base, task, train, test = setup(args)
    run_cell(base, task, shape, args.methods, train, test, device)
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(args.repeats):
        run_cell(base, task, shape, args.methods, train, test, device)
    print(time.time(), flush=True)


if __name__ == "__main__":
    main()
