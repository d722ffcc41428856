"""Where one client's personalization time (benchmark stage 3) goes, on the embedded model and data.

    .venv/bin/python docs/experiments/stage3_profile.py [--threads 1] [--client 0]

Everything runs in one process with one thread count (``torch.set_num_threads``):

(a) The machine's float32 matmul peak: best GFLOP/s of a few square matmuls (2 n^3 FLOPs each).
(b) One client of ``intents`` on ``multilingual-e5-small`` personalized the way the benchmark does it: the base
    model evaluated once, then lora, adalora, btlora (BayesTune search + fine-tune) and fedp2eft (a freshly
    initialised PS generator) at budgets 2, 4, 8, 16, each evaluated on the client's test set. The methods run
    unmodified through ``fedp2eft.core.methods.personalize``; the phases are timed from outside by wrapping the
    functions the method modules look up at call time (frozen_copy, attach_lora, get_peft_model, BTLoRAModel.__init__,
    train, train_btlora, features_for, select_top_ranks), by forward hooks on the trained model and on the
    generator, by optimizer step hooks, and by wrapping the task's collate functions. Time is exclusive: a phase
    nested in another (e.g. tokenization inside training) is only counted in the inner one.
(c) Useful fine-tuning FLOP/s: the forward+backward FLOPs of the real tokens the training steps processed
    (tokens counted from ``attention_mask``, padding excluded), divided by the measured training seconds
    (BayesTune search and fine-tuning, everything inside ``train``), and the ratio to the peak of (a).
    FLOPs per real token, summed over the transformer-block linear layers (in -> out, LoRA rank r; r = 0 where
    the module carries no LoRA, AdaLoRA counted at its allocated init_r since masked ranks are still computed):

        frozen base weight:  forward 2*in*out + backward 2*in*out (input gradient only, no weight gradient)
        LoRA A (r x in), B:  forward 2*r*(in+out) + backward 2*r*(in+out) (input gradients)
                                                  + 2*r*(in+out) (weight gradients)
        per layer and token: 4*in*out + 6*r*(in+out)

    Embeddings cost nothing; attention scores/softmax, layer norms, activations, the classifier head (once per
    sequence), the BT-LoRA gates and priors, AdaLoRA's orthogonality term and the optimizer count as not useful.
(d) Cost growth: the stage for several clients x budgets x methods (GROWTH_SIZES; every method set holds btlora,
    so each client pays the same shared work: base evaluation, features, generator output, BayesTune search),
    each client on a fresh context as in the benchmark; least squares of seconds = per_client * clients +
    slope * runs, and each size's deviation from that line.
(e) What the training time is made of below the phase level: torch.profiler self time of one lora r=8 run,
    grouped by operator kind, and the matmul rate at the shapes of a training step (base layer vs. LoRA).
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager

import torch

from fedp2eft.core import btlora as btlora_module
from fedp2eft.core import methods, personalization
from fedp2eft.core.methods import adalora, btlora, fedp2eft, lora
from fedp2eft.core.btlora import default_target_modules
from fedp2eft.core.generator import PSGenerator
from fedp2eft.core.training import train as plain_train
from fedp2eft.experiment import Setup
from fedp2eft.logs import quiet_third_party

MODEL = "multilingual-e5-small"
METHOD_ORDER = ("lora", "adalora", "btlora", "fedp2eft")
BUDGETS = (2, 4, 8, 16)
CALLERS = (personalization, lora, adalora, btlora, fedp2eft, btlora_module)  # the modules whose lookups are timed
CONFIG = methods.personalize_config(dict(lora_lr=1e-3, scale_lr=0.1, adalora_lr=1e-2))
TRAIN_SIGNATURE = inspect.signature(plain_train)
# (clients, budgets, methods) of the cost-growth table (d): 2 to 48 personalization runs
GROWTH_SIZES = (
    (1, (2, 8), ("btlora",)),
    (2, (2, 8), ("btlora", "lora")),
    (2, (2, 8), METHOD_ORDER),
    (3, BUDGETS, METHOD_ORDER),
)


# --- (a) peak --------------------------------------------------------------------------------------------------

def matmul_peak(sizes=(1024, 2048), repeats: int = 4) -> tuple[float, int]:
    """Best float32 GFLOP/s of a square matmul over ``sizes`` x ``repeats`` (after one warm-up each)."""
    best, best_size = 0.0, sizes[0]
    generator = torch.Generator().manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=generator)
        b = torch.randn(n, n, generator=generator)
        torch.mm(a, b)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            rate = 2 * n**3 / (time.perf_counter() - start) / 1e9
            if rate > best:
                best, best_size = rate, n
    return best, best_size


# --- exclusive phase clock ------------------------------------------------------------------------------------

class Clock:
    """Exclusive wall time per phase: entering a phase pauses the one it is nested in."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []
        self.mark = time.perf_counter()

    def _switch(self) -> None:
        now = time.perf_counter()
        if self.stack:
            self.seconds[self.stack[-1]] += now - self.mark
        self.mark = now

    def push(self, name: str) -> None:
        self._switch()
        self.stack.append(name)

    def pop(self) -> None:
        self._switch()
        self.stack.pop()

    @contextmanager
    def phase(self, name: str):
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    @property
    def group(self) -> str:
        """The group ("finetune", "search", "evaluate", ...) of the innermost phase."""
        return self.stack[-1].split(":")[0] if self.stack else "other"

    def timed(self, function, name: str):
        def wrapper(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)

        return wrapper


# --- FLOPs ----------------------------------------------------------------------------------------------------

def block_linears(base: torch.nn.Module) -> dict[str, tuple[int, int]]:
    modules = dict(base.named_modules())
    return {name: (modules[name].in_features, modules[name].out_features) for name in default_target_modules(base)}


def lora_ranks(model: torch.nn.Module, names: list[str]) -> dict[str, int]:
    """Rank of the LoRA on each base block linear in ``model`` (0 where it carries none)."""
    from peft.tuners.lora import LoraLayer

    ranks = dict.fromkeys(names, 0)
    for full, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = next((n for n in names if full == n or full.endswith("." + n)), None)
            if base is not None:
                ranks[base] = sum(module.r[a] for a in module.active_adapters if a in module.r)
    return ranks


def flops_per_token(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> int:
    return sum(4 * i * o + 6 * ranks[name] * (i + o) for name, (i, o) in shapes.items())


# --- instrumentation ------------------------------------------------------------------------------------------

class Profiler:
    """Wraps the functions ``methods`` calls and counts the tokens and FLOPs of every training step."""

    def __init__(self, clock: Clock, shapes: dict[str, tuple[int, int]]) -> None:
        self.clock = clock
        self.shapes = shapes
        self.real_tokens = 0
        self.padded_tokens = 0
        self.flops = 0.0
        self.padded_flops = 0.0
        self.forward_calls = 0
        self.in_search = False

    def train(self, *args, **kwargs):
        bound = TRAIN_SIGNATURE.bind(*args, **kwargs)
        group = "search" if self.in_search else "finetune"
        model, optimizer = bound.arguments["model"], bound.arguments["optimizer"]
        per_token = flops_per_token(self.shapes, lora_ranks(model, list(self.shapes)))
        clock = self.clock

        def before_forward(_module, _args, inputs):
            mask = inputs["attention_mask"]
            tokens = int(mask.sum())
            self.real_tokens += tokens
            self.padded_tokens += mask.numel()
            self.flops += tokens * per_token
            self.padded_flops += mask.numel() * per_token
            self.forward_calls += 1
            clock.push(f"{group}: forward")

        with ExitStack() as stack:
            handles = [
                model.register_forward_pre_hook(before_forward, with_kwargs=True),
                model.register_forward_hook(lambda *_: clock.pop()),
                optimizer.register_step_pre_hook(lambda *_: clock.push(f"{group}: optimizer step")),
                optimizer.register_step_post_hook(lambda *_: clock.pop()),
            ]
            for handle in handles:
                stack.callback(handle.remove)
            if bound.arguments.get("extra_loss") is not None:
                bound.arguments["extra_loss"] = clock.timed(bound.arguments["extra_loss"], f"{group}: BT-LoRA priors")
            if bound.arguments.get("after_step") is not None:
                bound.arguments["after_step"] = clock.timed(bound.arguments["after_step"],
                                                            f"{group}: AdaLoRA rank allocation")
            with clock.phase(f"{group}: backward + loop"):
                return plain_train(*bound.args, **bound.kwargs)

    def train_btlora(self, function):
        def wrapper(*args, **kwargs):
            self.in_search = True
            try:
                return function(*args, **kwargs)
            finally:
                self.in_search = False

        return wrapper

    @contextmanager
    def installed(self, task, generator: PSGenerator):
        """Patch the names the method modules call (and BT-LoRA's constructor) for the duration, in every module
        that looks them up; everything is restored afterwards."""
        clock = self.clock
        wrappers = {
            "frozen_copy": lambda f: clock.timed(f, "prepare: frozen copy"),
            "attach_lora": lambda f: clock.timed(f, "prepare: PEFT wrap + adapters"),
            "get_peft_model": lambda f: clock.timed(f, "prepare: PEFT wrap + adapters"),
            "train": lambda f: self.train,
            "train_btlora": self.train_btlora,
            "features_for": lambda f: clock.timed(f, "features: base forward + moments"),
            "select_top_ranks": lambda f: clock.timed(f, "other: rank selection"),
        }
        saved = [(module, name, getattr(module, name)) for module in CALLERS for name in wrappers
                 if hasattr(module, name)]
        missing = set(wrappers) - {name for _, name, _ in saved}
        if missing:  # a renamed function would silently drop out of the profile: stop and say which
            raise SystemExit(f"stage3_profile: {', '.join(sorted(missing))} no longer found in "
                             f"{', '.join(m.__name__ for m in CALLERS)}; update the profile's wrappers")
        saved_init = btlora_module.BTLoRAModel.__init__
        saved_collates = {name: getattr(task, name) for name in ("collate", "feature_collate")}

        def collate(function, suffix):
            return lambda examples: clock.timed(function, f"{clock.group}: {suffix}")(examples)

        for module, name, original in saved:
            setattr(module, name, wrappers[name](original))
        btlora_module.BTLoRAModel.__init__ = clock.timed(saved_init, "prepare: BT-LoRA gates")
        task.collate = collate(saved_collates["collate"], "tokenize")
        task.feature_collate = collate(saved_collates["feature_collate"], "tokenize")
        handles = [generator.register_forward_pre_hook(lambda *_: clock.push("generator: inference")),
                   generator.register_forward_hook(lambda *_: clock.pop())]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, name, original in saved:
                setattr(module, name, original)
            btlora_module.BTLoRAModel.__init__ = saved_init
            for name in saved_collates:
                delattr(task, name)  # back to the class's methods


# --- the stage --------------------------------------------------------------------------------------------------

def run_stage(base, task, client, generator, runs, clock: Clock, record: list | None = None) -> float:
    """The benchmark's per-client stage: base evaluation, then every (method, budget) run and its evaluation."""
    start = time.perf_counter()
    with clock.phase("other: stage glue"):
        with clock.phase("evaluate: forward"):
            task.evaluate(base, client.test)
        context = methods.ClientContext(base, task, client.train, {"psg": generator})
        for method, budget in runs:
            run_start = time.perf_counter()
            with clock.phase("other: personalize glue"):
                result = methods.personalize(method, context, budget=budget, config=CONFIG)
            with clock.phase("evaluate: forward"):
                task.evaluate(result.model, client.test)
            if record is not None:
                record.append((method, budget, time.perf_counter() - run_start, result.metrics.get("steps", 0)))
            del result
    return time.perf_counter() - start


OPERATOR_KINDS = (
    ("matmul (mm, addmm, bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("dropout (bernoulli_, masks)", ("aten::bernoulli_", "aten::native_dropout", "aten::native_dropout_backward")),
    ("GELU forward + backward", ("aten::gelu", "aten::gelu_backward")),
    ("softmax / layer norm / attention", ("aten::_softmax", "aten::_softmax_backward_data", "aten::native_layer_norm",
                                          "aten::native_layer_norm_backward",
                                          "aten::_scaled_dot_product_flash_attention_for_cpu",
                                          "aten::_scaled_dot_product_flash_attention_for_cpu_backward")),
)


def operator_breakdown(base, task, client, tokens_per_call: int, peak: float) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as trace:
        methods.personalize("lora", base, task, client.train, 8, CONFIG)
    self_us: dict[str, float] = defaultdict(float)
    lora_us = 0.0
    for event in trace.key_averages(group_by_input_shape=True):
        self_us[event.key] += event.self_cpu_time_total
        dims = [d for shape in (event.input_shapes or []) if shape for d in shape]
        if event.key in ("aten::mm", "aten::addmm") and dims and min(dims) <= 8:  # a rank-8 side: LoRA A or B
            lora_us += event.self_cpu_time_total
    total = sum(self_us.values())
    print("\n(e) operator self time of one lora r=8 personalization (torch.profiler)")
    rest = total
    for title, keys in OPERATOR_KINDS:
        share = sum(self_us.get(key, 0.0) for key in keys)
        rest -= share
        print(f"  {title:<44}{share / total:>7.1%}")
        if keys[0] == "aten::mm":
            print(f"  {'  of which LoRA matmuls (a side of 8)':<44}{lora_us / total:>7.1%}")
    print(f"  {'other (elementwise, copies, views, AdamW)':<44}{rest / total:>7.1%}")
    rows = max(1, tokens_per_call)
    print(f"  matmul rate at a training call's shape ({rows} padded tokens, one length group):")
    for label, (k, n) in (("base 384->384", (384, 384)), ("base 384->1536", (384, 1536)),
                          ("LoRA A 384->8", (384, 8)), ("LoRA B 8->384", (8, 384))):
        a, w = torch.randn(rows, k), torch.randn(k, n)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(20):
                torch.mm(a, w)
            best = min(best, (time.perf_counter() - start) / 20)
        rate = 2 * rows * k * n / best / 1e9
        print(f"    {label:<16}{rate:>7.1f} GFLOP/s ({rate / peak:.0%} of peak)")


GROUPS = (
    ("model preparation", ("prepare",)),
    ("BayesTune search (training)", ("search",)),
    ("fine-tuning (training)", ("finetune",)),
    ("evaluation", ("evaluate",)),
    ("feature extraction", ("features",)),
    ("generator inference", ("generator",)),
    ("other", ("other",)),
)


def print_phase_table(seconds: dict[str, float], total: float, runs: int) -> None:
    print(f"\n{'phase':<44}{'seconds':>9}{'share':>8}{'per run':>9}")
    print("-" * 70)
    for title, prefixes in GROUPS:
        names = sorted(name for name in seconds if name.split(":")[0] in prefixes)
        group_total = sum(seconds[name] for name in names)
        if not names:
            continue
        print(f"{title:<44}{group_total:>9.2f}{group_total / total:>8.1%}{group_total / runs:>9.3f}")
        for name in names:
            detail = "  " + name.split(": ", 1)[1]
            print(f"{detail:<44}{seconds[name]:>9.2f}{seconds[name] / total:>8.1%}{seconds[name] / runs:>9.3f}")
    print("-" * 70)
    print(f"{'total (wall)':<44}{total:>9.2f}{1:>8.1%}{total / runs:>9.3f}")


def least_squares(rows: list[tuple[float, float]], targets: list[float]) -> tuple[float, float]:
    """(a, b) minimising the squared error of a*x + b*y against the targets, no intercept: a stage with no clients
    costs nothing."""
    solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                                  torch.tensor(targets, dtype=torch.float64).unsqueeze(1)).solution
    return float(solution[0]), float(solution[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--client", type=int, default=0, help="index of the client in the seen pool")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_third_party()
    wall = time.perf_counter()

    peak, peak_size = matmul_peak()
    print(f"threads: {torch.get_num_threads()}   torch {torch.__version__}")
    print(f"(a) fp32 matmul peak: {peak:.1f} GFLOP/s (best of square matmuls, n={peak_size})")

    setup = Setup.from_config({"model": MODEL, "dataset": "intents", "dataset_options": {}, "max_length": 64})
    load = time.perf_counter()
    base = setup.load_base_model(new_head_seed=0)  # an untrained head: only the time is measured
    task = setup.task
    client = setup.data.seen[args.client]
    print(f"base model load: {time.perf_counter() - load:.1f} s (not part of the stage)")
    torch.manual_seed(0)
    generator = PSGenerator(methods.generator_spec(base, CONFIG, MODEL))
    shapes = block_linears(base)
    print(f"client {client.client_id}: {len(client.train)} train / {len(client.test)} test examples; "
          f"{len(shapes)} LoRA target modules; batch {CONFIG.batch_size}, {CONFIG.epochs} epochs")

    runs = [(method, budget) for method in METHOD_ORDER for budget in BUDGETS]
    clock = Clock()
    profiler = Profiler(clock, shapes)
    record: list = []
    with profiler.installed(task, generator):
        total = run_stage(base, task, client, generator, runs, clock, record)

    print(f"\n(b) stage 3 of one client: {len(runs)} runs ({len(METHOD_ORDER)} methods x budgets "
          f"{', '.join(map(str, BUDGETS))}) + base evaluation")
    print_phase_table(clock.seconds, total, len(runs))

    print(f"\n{'method':<10}{'budget':>7}{'seconds':>9}{'steps':>7}")
    for method, budget, seconds, steps in record:
        print(f"{method:<10}{budget:>7}{seconds:>9.2f}{steps:>7}")
    for method in METHOD_ORDER:
        mine = [seconds for m, _, seconds, _ in record if m == method]
        print(f"  {method:<10} mean per run {sum(mine) / len(mine):.2f} s")
    print("  (the first btlora run carries the client's BayesTune search, the first fedp2eft run its features: "
          "both are shared by the later budgets)")
    print(f"  all runs   mean per run {sum(r[2] for r in record) / len(record):.2f} s "
          f"(stage total / runs: {total / len(runs):.2f} s)")

    training = sum(seconds for name, seconds in clock.seconds.items() if name.split(":")[0] in ("search", "finetune"))
    matmul_part = sum(seconds for name, seconds in clock.seconds.items()
                      if name.endswith(("forward", "backward + loop")) and name.split(":")[0] in ("search", "finetune"))
    useful = profiler.flops / training / 1e9
    useful_fb = profiler.flops / matmul_part / 1e9
    print(f"\n(c) training: {profiler.forward_calls} forward calls (length groups), {profiler.real_tokens} real "
          f"tokens ({profiler.padded_tokens} with padding, {profiler.real_tokens / profiler.padded_tokens:.0%} real), "
          f"{profiler.flops / 1e12:.3f} TFLOP useful")
    print(f"    useful FLOP/s over all training time ({training:.2f} s): {useful:.1f} GFLOP/s "
          f"= {useful / peak:.1%} of the {peak:.1f} GFLOP/s peak")
    print(f"    over forward + backward time only ({matmul_part:.2f} s): {useful_fb:.1f} GFLOP/s "
          f"= {useful_fb / peak:.1%} of peak")
    padded = profiler.padded_flops / training / 1e9
    print(f"    counting padding tokens as work too: {padded:.1f} GFLOP/s = {padded / peak:.1%} of peak "
          f"(so {1 - profiler.flops / profiler.padded_flops:.0%} of the matmul work is spent on padding)")

    print("\n(d) cost growth: clients x budgets x methods, each client on a fresh context")
    growth = []
    for clients, budgets, names in GROWTH_SIZES:
        runs = [(method, budget) for method in names for budget in budgets]
        seconds = sum(run_stage(base, task, setup.data.seen[args.client + i], generator, runs, Clock())
                      for i in range(clients))
        growth.append((clients, len(budgets), len(names), clients * len(runs), seconds))
    per_client, slope = least_squares([(c, r) for c, _, _, r, _ in growth], [t for *_, t in growth])
    print(f"{'clients':>8}{'budgets':>8}{'methods':>8}{'runs':>6}{'seconds':>9}{'line':>9}{'deviation':>11}")
    for clients, budgets, names, runs, seconds in growth:
        line = per_client * clients + slope * runs
        deviation = (seconds - line) / line
        print(f"{clients:>8}{budgets:>8}{names:>8}{runs:>6}{seconds:>9.2f}{line:>9.2f}{deviation:>+11.1%}")
    print(f"slope {slope:.2f} s per personalization run; {per_client:.2f} s per client paid once (base evaluation, "
          f"features, generator output, BayesTune search)")
    operator_breakdown(base, task, client, profiler.padded_tokens // max(1, profiler.forward_calls), peak)
    print(f"\nscript wall time: {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
