"""Greedy decoding speed with and without the key/value cache, and one request at a time against a batch of
``--batch`` requests decoded together (``InstructionTask.generate`` and ``generate_batch``).

    .venv/bin/python benchmarks/generation_speed.py [--threads 2] [--new-tokens 32] [--prompt-words 40] [--batch 16]

A randomly initialised Llama-like decoder of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads,
vocabulary 49152): speed depends on the shape, not on the weights, and no download is needed. Generation is
forced to run to ``--new-tokens`` (no EOS). Both paths produce the same tokens (checked here and in the tests);
the cached one runs the prompt once and then one position per token. The batch's prompts differ in length (left
padding); the batch must give every prompt the tokens it gets alone (checked here and in the tests)."""

from __future__ import annotations

import argparse
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedp2eft.core.tasks import InstructionTask

SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)


def word_tokenizer(words: int) -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i + 3 for i in range(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, eos_token_id=None, pad_token_id=0)).eval()
    task = InstructionTask(word_tokenizer(1000), max_length=2048, generation_tokens=args.new_tokens)
    instruction = " ".join(f"w{i}" for i in range(args.prompt_words))
    print(f"threads {torch.get_num_threads()}, prompt {len(task.prompt_ids(instruction))} tokens, "
          f"{args.new_tokens} new tokens, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    results = {}
    for use_cache in (True, False, True):  # cached twice: the first call also warms up
        start = time.perf_counter()
        tokens = task.generate(model, instruction, use_cache=use_cache)
        results[use_cache] = (tokens, len(tokens) / (time.perf_counter() - start))
    (cached, cached_rate), (plain, plain_rate) = results[True], results[False]
    assert cached == plain, "the cache changed the generated tokens"
    print(f"with cache    {cached_rate:8.1f} tokens/s\nwithout cache {plain_rate:8.1f} tokens/s\n"
          f"speed-up {cached_rate / plain_rate:.1f}x (same {len(cached)} tokens)")

    prompts = [" ".join(f"w{i + k}" for i in range(args.prompt_words - k % 8)) for k in range(args.batch)]
    start = time.perf_counter()
    alone = [task.generate(model, prompt) for prompt in prompts]
    alone_rate = sum(map(len, alone)) / (time.perf_counter() - start)
    start = time.perf_counter()
    (together,) = task.generate_batch(model, prompts)
    batch_rate = sum(map(len, together)) / (time.perf_counter() - start)
    assert together == alone, "the batch changed some prompt's tokens"
    print(f"{args.batch} requests, one at a time {alone_rate:8.1f} tokens/s\n"
          f"{args.batch} requests, one batch    {batch_rate:8.1f} tokens/s\n"
          f"speed-up {batch_rate / alone_rate:.1f}x (same tokens for every request)")


if __name__ == "__main__":
    main()
