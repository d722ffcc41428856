"""Training-step time of BT-LoRA vs plain PEFT LoRA of the same max rank on a BERT-base-sized random model.

Runs the two interleaved (A, B, A, B, ...) so machine noise hits both alike, and prints the median ratio.
    python benchmarks/btlora_step_time.py [--repeats 15] [--batch 16] [--seq 128] [--rank 32]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import BertConfig

from fedp2eft.core.btlora import BTLoRAModel, PriorConfig, attach_lora, default_target_modules
from fedp2eft.core.modeling import classifier_from_config


def step_timer(model, parameters, batch, extra_loss=None):
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.0)

    def step() -> float:
        start = time.perf_counter()
        loss = model(**batch).loss
        if extra_loss is not None:
            loss = loss + extra_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()

    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = classifier_from_config(config, ["a", "b", "c"])
    targets = default_target_modules(base)
    ranks = {name: args.rank for name in targets}
    lora = attach_lora(copy.deepcopy(base), ranks, 2.0)
    btlora = BTLoRAModel(copy.deepcopy(base), ranks, 2.0, init_scales=0.5, priors=PriorConfig())
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 30522, (args.batch, args.seq), generator=generator),
             "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
             "labels": torch.randint(0, 3, (args.batch,), generator=generator)}
    lora_step = step_timer(lora, [p for p in lora.parameters() if p.requires_grad], batch)
    bt_step = step_timer(btlora, [{"params": btlora.lora_parameters()},
                                  {"params": btlora.scale_parameters(), "lr": 1e-2}], batch,
                         extra_loss=lambda: btlora.prior_loss(100))
    lora_step(), bt_step()  # warm-up
    ratios, lora_times, bt_times = [], [], []
    for _ in range(args.repeats):
        a, b = lora_step(), bt_step()
        lora_times.append(a)
        bt_times.append(b)
        ratios.append(b / a)
    print(f"modules with LoRA: {len(targets)}, rank {args.rank}, batch {args.batch}, seq {args.seq}, "
          f"threads {torch.get_num_threads()}")
    print(f"PEFT LoRA step: median {statistics.median(lora_times):.3f} s")
    print(f"BT-LoRA step (gates + both priors): median {statistics.median(bt_times):.3f} s")
    print(f"median ratio BT-LoRA / LoRA: {statistics.median(ratios):.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
