"""The paper profile's personalization speed on a device: one client of the paper's XNLI setting per method, timed.

The paper's XNLI client (docs/method.md, "Benchmark regime"; `paper` profile): 100 training and 25 test premise/
hypothesis pairs, at most 128 tokens, batch 32, 2 epochs, max rank R=32, here at budget r=8. The model has
mBERT's shape (vocabulary 119547, 12 layers, hidden 768) with random weights, built from a config, so nothing is
downloaded: the time of a step does not depend on the weights. The texts are random words of a synthetic
word-level tokenizer, with pair lengths drawn so that batches carry padding as real ones do. FedP²EFT uses a
freshly initialised PS generator, FedL2P a fresh meta-net, both of the right layout and on the device (their
outputs decide ranks and learning rates, not the time).

Each method runs ``personalize()`` unmodified (the one training loop, bf16 autocast on a GPU that supports it),
``--repeats`` times after one warm-up run; evaluation of the 25 test pairs is timed apart. With ``--baseline-cpu``
the same LoRA run also runs on this machine's CPU once, so the printed speed-up compares two devices of the same
machine in the same run. With ``--processes 1 4 8`` it also measures clients personalized at the same time on one
device: that many processes each build the model, warm up, wait for a common start and then run LoRA
``--repeats`` times; the throughput is all their runs over the time from that start to the last one's end.

    python benchmarks/paper_step_time.py [--device auto] [--repeats 3] [--baseline-cpu] [--processes 1 4 8]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import subprocess
import sys
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, PreTrainedTokenizerFast

from fedp2eft.core.device import resolve_device
from fedp2eft.core.fedl2p import LRMetaNet, metanet_spec
from fedp2eft.core.generator import PSGenerator
from fedp2eft.core.methods import ClientContext, PersonalizeConfig, generator_spec, personalize
from fedp2eft.core.modeling import classifier_from_config
from fedp2eft.core.tasks import ClassificationTask

MBERT = {"vocab_size": 119547, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
         "intermediate_size": 3072, "max_position_embeddings": 512}
LABELS = ["entailment", "neutral", "contradiction"]
WORDS = [f"w{i}" for i in range(5000)]
BUDGET = 8


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``WORDS`` with BERT's pair template."""
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def pairs(count: int, seed: int) -> list[dict]:
    """Premises of 20-90 words and hypotheses of 5-30, like XNLI's spread; labels uniform."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choices(WORDS, k=rng.randint(20, 90))),
             "text_pair": " ".join(rng.choices(WORDS, k=rng.randint(5, 30))),
             "label": rng.randrange(len(LABELS))} for _ in range(count)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_run(method: str, context: ClientContext, config: PersonalizeConfig, test: list[dict],
             device: torch.device) -> tuple[float, float, int]:
    """Seconds of one personalization, seconds of its evaluation, and its optimizer steps."""
    synchronize(device)
    start = time.perf_counter()
    result = personalize(method, context, budget=BUDGET, config=config)
    synchronize(device)
    trained = time.perf_counter()
    context.task.evaluate(result.model, test)
    synchronize(device)
    return trained - start, time.perf_counter() - trained, int(result.metrics["steps"])


def client_context(base: torch.nn.Module, task: ClassificationTask, config: PersonalizeConfig,
                   train: list[dict]) -> ClientContext:
    """A fresh context per run: nothing shared between repeats (features and searches are recomputed)."""
    device, name = next(base.parameters()).device, "mbert-shaped-random"
    generator = PSGenerator(generator_spec(base, config, name)).to(device)
    metanet = LRMetaNet(metanet_spec(base, config, name, BUDGET), base_lr=config.lora_lr).to(device)
    return ClientContext(base, task, train, {"psg": generator, "fedl2p": {BUDGET: metanet}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--methods", nargs="+", default=["lora", "adalora", "btlora", "fedl2p", "fedp2eft"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-cpu", action="store_true", help="also time one LoRA run on the CPU")
    parser.add_argument("--layers", type=int, default=MBERT["num_hidden_layers"],
                        help="encoder layers (default mBERT's 12; fewer for a quick check)")
    parser.add_argument("--processes", type=int, nargs="*", default=[],
                        help="also time this many concurrent LoRA clients on the device, per value")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one of the concurrent clients
    args = parser.parse_args()
    if args.child:
        return concurrent_child(args)
    device, on_device, task, config, train, test = setup(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    tokens = sum(int(task.collate([row])["attention_mask"].sum()) for row in train) * config.epochs
    print(f"device: {name}; mBERT-shaped, {args.layers} layers; 100 train / 25 test pairs, batch 32, "
          f"{config.epochs} epochs, R={config.max_rank}, r={BUDGET}; {tokens} real training tokens per run")
    print(f"{'method':<10}{'run s':>9}{'steps':>7}{'s/step':>9}{'tokens/s':>10}{'eval s':>9}")
    lora_seconds = None
    for method in args.methods:
        runs = [time_run(method, client_context(on_device, task, config, train), config, test, device)
                for _ in range(args.repeats + 1)][1:]
        seconds = statistics.median(run[0] for run in runs)
        evaluation = statistics.median(run[1] for run in runs)
        steps = runs[0][2]
        lora_seconds = seconds if method == "lora" else lora_seconds
        print(f"{method:<10}{seconds:>9.3f}{steps:>7}{seconds / steps:>9.4f}{tokens / seconds:>10.0f}"
              f"{evaluation:>9.3f}")
    if args.baseline_cpu and device.type != "cpu" and lora_seconds is not None:
        cpu_base = copy.deepcopy(on_device).to("cpu")
        cpu_seconds, _, _ = time_run("lora", client_context(cpu_base, task, config, train), config, test,
                                     torch.device("cpu"))
        print(f"lora on the CPU ({torch.get_num_threads()} threads): {cpu_seconds:.2f} s per run; "
              f"{name} is {cpu_seconds / lora_seconds:.1f}x faster")
    for count in args.processes:
        runs_per_second = concurrent(count, args)
        print(f"{count} clients at once on {name}: {runs_per_second:.2f} LoRA runs/s "
              f"({runs_per_second * (lora_seconds or float('nan')):.1f}x one client's rate)")


def setup(args: argparse.Namespace):
    """The model on the device, the task, the config and one client's data."""
    device = resolve_device(args.device)
    torch.manual_seed(0)
    base = classifier_from_config(BertConfig(**{**MBERT, "num_hidden_layers": args.layers}), LABELS).eval()
    return device, base.to(device), ClassificationTask(word_tokenizer(), LABELS, max_length=128), \
        PersonalizeConfig(batch_size=32), pairs(100, seed=1), pairs(25, seed=2)


def concurrent(count: int, args: argparse.Namespace) -> float:
    """LoRA runs per second of ``count`` processes personalizing at once, timed from a common start: each child
    builds its model and warms up, says so, and waits for the go."""
    command = [sys.executable, __file__, "--device", args.device, "--layers", str(args.layers), "--repeats",
               str(args.repeats), "--child"]
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
    """Build, warm up, say ready, wait for the go, run LoRA ``--repeats`` times; print the end time."""
    device, base, task, config, train, test = setup(args)
    time_run("lora", client_context(base, task, config, train), config, test, device)
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(args.repeats):
        time_run("lora", client_context(base, task, config, train), config, test, device)
    print(time.time(), flush=True)


if __name__ == "__main__":
    main()
