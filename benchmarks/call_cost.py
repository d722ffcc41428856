"""What one forward+backward call of the embedded model costs on the CPU, by batch shape: the fixed cost per call
and the cost per token that ``tasks.CPU_CALL_COST_TOKENS`` is derived from (docs/method.md, "Speed").

    .venv/bin/python benchmarks/call_cost.py [--threads 1]

A rank-8 LoRA on every block linear of multilingual-e5-small, train mode, random token ids; best of 5 timings per
shape, then the least-squares line seconds = fixed + per_token * tokens over all shapes."""

from __future__ import annotations

import argparse
import time

import torch

from fedp2eft.core.btlora import attach_lora, resolve_target_modules
from fedp2eft.core.personalization import frozen_copy
from fedp2eft.experiment import Setup
from fedp2eft.logs import quiet_third_party

SHAPES = ((1, 9), (2, 9), (4, 9), (8, 9), (16, 9), (12, 11), (4, 25), (16, 17), (16, 25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_third_party()
    setup = Setup.from_config({"model": "multilingual-e5-small", "dataset": "intents", "dataset_options": {},
                               "max_length": 64})
    base = setup.load_base_model(new_head_seed=0)  # an untrained head: only the time is measured
    model = attach_lora(frozen_copy(base), {name: 8 for name in resolve_target_modules(base, None)}, 2.0)
    model.train()

    def step(rows: int, length: int) -> None:
        ids = torch.randint(5, 1000, (rows, length))
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(rows, dtype=torch.long))
        loss.loss.backward()

    tokens, seconds = [], []
    print(f"{'rows':>5}{'length':>8}{'tokens':>8}{'ms':>9}")
    for rows, length in SHAPES:
        step(rows, length)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            step(rows, length)
            best = min(best, time.perf_counter() - start)
        tokens.append(rows * length)
        seconds.append(best)
        print(f"{rows:>5}{length:>8}{rows * length:>8}{best * 1000:>9.1f}")
    x, y = torch.tensor(tokens, dtype=torch.float64), torch.tensor(seconds, dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    fixed = float(y.mean() - slope * x.mean())
    print(f"fixed cost per call {fixed * 1000:.1f} ms, per token {slope * 1000:.2f} ms: one call costs as much as "
          f"{fixed / slope:.0f} tokens")


if __name__ == "__main__":
    main()
