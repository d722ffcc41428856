"""What differs between sequence classification and instruction tuning: batching, validation and evaluation.
Everything else (training loop, methods, features) is shared."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedp2eft.core.device import autocast_for, model_device, to_device
from fedp2eft.errors import FedP2EFTError

IGNORE_INDEX = -100
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass
class ClassificationTask:
    """Texts (optionally text pairs) -> one of ``labels``; metric: accuracy."""

    tokenizer: PreTrainedTokenizerBase
    labels: list[str]
    max_length: int = 128
    kind: str = "classification"
    precision: str = "fp32"  # how forward passes compute: bf16 (mixed precision) or fp32 (core/device.py)

    def check(self, examples: list[dict], where: str) -> None:
        _check_nonempty(examples, where)
        for row, example in enumerate(examples):
            label = example.get("label")
            if not isinstance(label, int) or not 0 <= label < len(self.labels):
                raise FedP2EFTError(
                    f"{where}, example {row}: label {label!r} is not in the model's label set "
                    f"(0..{len(self.labels) - 1}: {', '.join(self.labels[:8])}...); fix the data or the label list"
                )

    def feature_collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """The model inputs of ``collate`` without the labels (what client features are computed from)."""
        texts = [example["text"] for example in examples]
        pairs = [example["text_pair"] for example in examples] if "text_pair" in examples[0] else None
        batch = self.tokenizer(
            texts, pairs, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        if pairs is None:
            batch.pop("token_type_ids", None)  # all zeros for single texts, and not every encoder accepts them
        return dict(batch)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.feature_collate(examples)
        batch["labels"] = torch.tensor([example["label"] for example in examples])
        return batch

    @staticmethod
    def loss_units(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How much of the batch's mean loss each row carries: one example each."""
        return torch.ones(len(batch["labels"]))

    @staticmethod
    def run_losses(logits: torch.Tensor, labels: torch.Tensor, runs: int) -> torch.Tensor:
        """Each run's mean loss over ``labels``, from the logits of ``runs`` copies of the batch (run-major rows)."""
        losses = nn.functional.cross_entropy(logits, labels.repeat(runs), reduction="none")
        return losses.view(runs, -1).mean(1)

    def evaluate(self, model: nn.Module, examples: list[dict], batch_size: int = 32) -> dict[str, float]:
        """Accuracy and mean loss; batches go to the model's device (bf16 autocast when ``precision`` is bf16)."""
        return self.evaluate_runs(model, examples, batch_size)[0]

    def evaluate_runs(self, model: nn.Module, examples: list[dict], batch_size: int = 32) -> list[dict]:
        """``evaluate`` for every run of a model that holds several (``core/multi_lora.py``) in one pass."""
        model.eval()
        device = model_device(model)
        runs = run_count(model)
        correct, loss_sum = torch.zeros(runs, dtype=torch.long), torch.zeros(runs, dtype=torch.float64)
        with _evaluation(device, self.precision):
            for batch in iterate_batches(examples, self.collate, batch_size):
                for part, _ in length_groups(batch, self.loss_units, device):
                    part = to_device(part, device)
                    output = model(**part)
                    predicted = output.logits.argmax(-1).view(runs, -1).cpu()
                    correct += (predicted == part["labels"].cpu()).sum(1)
                    loss_sum += output.loss.double().cpu().reshape(runs) * len(part["labels"])
        return [{"accuracy": int(right) / len(examples), "loss": float(lost) / len(examples), "correct": int(right),
                 "count": len(examples), "scores": {"accuracy": (int(right), len(examples))}}
                for right, lost in zip(correct, loss_sum)]


@dataclass
class InstructionTask:
    """Instruction -> response with a causal LM; the loss covers response tokens only.

    With ``generation_tokens > 0`` evaluation also decodes greedily and reports ROUGE-L F1 against the
    reference, computed on tokenizer tokens (so it works for scripts without spaces, e.g. Chinese)."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int = 256
    generation_tokens: int = 0
    precision: str = "fp32"  # how forward passes compute: bf16 (mixed precision) or fp32 (core/device.py)
    kind: str = "instruction"

    def check(self, examples: list[dict], where: str) -> None:
        _check_nonempty(examples, where)
        for row, example in enumerate(examples):
            if not example.get("instruction") or not example.get("response"):
                raise FedP2EFTError(f"{where}, example {row}: needs a non-empty 'instruction' and 'response'")
            prompt = len(self.prompt_ids(example["instruction"]))
            if prompt >= self.max_length:
                raise FedP2EFTError(
                    f"{where}, example {row}: its prompt alone is {prompt} tokens and max_length is "
                    f"{self.max_length}, so no token of its response would be trained or scored; raise max_length "
                    f"or shorten the instruction")

    def prompt_ids(self, instruction: str) -> list[int]:
        """Token ids of the prompt template around ``instruction`` (special tokens included)."""
        return self.tokenizer(PROMPT_TEMPLATE.format(instruction=instruction))["input_ids"]

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Prompt + response (+ EOS) cut to ``max_length``: a response that does not fit loses its end (and the EOS),
        never the whole example; the loss covers the response tokens that remain (``check`` refuses a prompt that
        leaves room for none)."""
        rows, labels = [], []
        for example in examples:
            prompt = self.prompt_ids(example["instruction"])
            response = self.tokenizer(example["response"], add_special_tokens=False)["input_ids"]
            if self.tokenizer.eos_token_id is not None:
                response = response + [self.tokenizer.eos_token_id]
            rows.append((prompt + response)[: self.max_length])
            labels.append(([IGNORE_INDEX] * len(prompt) + response)[: self.max_length])
        batch = _right_pad(rows, self.pad_id)
        width = batch["input_ids"].shape[1]
        batch["labels"] = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels])
        return batch

    @staticmethod
    def loss_units(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How much of the batch's mean loss each row carries: its predicted response tokens (the causal LM loss
        is the mean over tokens whose next-token label is not ignored)."""
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)

    def feature_collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """The prompts alone (template + instruction), padded, with their attention mask. Client features are
        computed from these: the response is the label and must not leak into them (docs/method.md, "Client
        features")."""
        return _right_pad([self.prompt_ids(example["instruction"])[: self.max_length] for example in examples],
                          self.pad_id)

    @staticmethod
    def run_losses(logits: torch.Tensor, labels: torch.Tensor, runs: int) -> torch.Tensor:
        """Each run's mean next-token loss over the response tokens of ``labels``, from the logits of ``runs`` copies
        of the batch (run-major rows)."""
        target = labels[:, 1:].repeat(runs, 1)
        losses = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), reduction="none",
                                             ignore_index=IGNORE_INDEX)
        return losses.view(runs, -1).sum(1) / (labels[:, 1:] != IGNORE_INDEX).sum()

    def evaluate(self, model: nn.Module, examples: list[dict], batch_size: int = 16) -> dict[str, float]:
        """Token-level loss and next-token accuracy over response tokens, pooled over the whole set; with
        ``generation_tokens`` also the greedy generations' ROUGE-L F1 and exact match.

        ``scores`` holds every metric as (sum, count) so that a report can pool it over clients like accuracy; the
        first one is the task's main metric (ROUGE-L when generations are scored, else next-token accuracy)."""
        return self.evaluate_runs(model, examples, batch_size)[0]

    def evaluate_runs(self, model: nn.Module, examples: list[dict], batch_size: int = 16) -> list[dict]:
        """``evaluate`` for every run of a model that holds several (``core/multi_lora.py``) in one pass, its
        generations decoded ``batch_size`` instructions at a time for all runs at once (``generate_batch``)."""
        model.eval()
        device = model_device(model)
        runs = run_count(model)
        generations: list[list[list[int]]] = [[] for _ in range(runs)]
        for start in range(0, len(examples) if self.generation_tokens > 0 else 0, batch_size):
            chunk = [example["instruction"] for example in examples[start:start + batch_size]]
            for run, generated in enumerate(self.generate_batch(model, chunk)):
                generations[run] += generated
        loss_sum, correct = torch.zeros(runs, dtype=torch.float64), torch.zeros(runs, dtype=torch.long)
        count = 0
        with _evaluation(device, self.precision):
            for batch in iterate_batches(examples, self.collate, batch_size):
                for part, _ in length_groups(batch, self.loss_units, device):
                    part = to_device(part, device)
                    logits = model(**part).logits[:, :-1]
                    logits = logits.reshape(runs, -1, *logits.shape[1:])
                    target = part["labels"][:, 1:]
                    keep = target != IGNORE_INDEX
                    for run in range(runs):
                        loss_sum[run] += float(nn.functional.cross_entropy(logits[run][keep], target[keep],
                                                                           reduction="sum"))
                        correct[run] += int((logits[run].argmax(-1)[keep] == target[keep]).sum())
                    count += int(keep.sum())
        results = []
        for run, (lost, right) in enumerate(zip(loss_sum.tolist(), correct.tolist())):
            metrics = {"loss": lost / count, "perplexity": math.exp(min(lost / count, 50.0)),
                       "token_accuracy": right / count, "correct": right, "count": count,
                       "scores": {"token_accuracy": (right, count)}}
            if self.generation_tokens > 0:
                rouge, exact = 0.0, 0
                for example, generated in zip(examples, generations[run]):
                    reference = self.tokenizer(example["response"], add_special_tokens=False)["input_ids"]
                    rouge += rouge_l(generated, reference)
                    exact += int(_normalized(self.tokenizer.decode(generated, skip_special_tokens=True))
                                 == _normalized(example["response"]))
                metrics.update(rouge_l=rouge / len(examples), exact_match=exact / len(examples))
                metrics["scores"] = {"rouge_l": (rouge, len(examples)), "exact_match": (exact, len(examples)),
                                     **metrics["scores"]}
            results.append(metrics)
        return results

    def generate(self, model: nn.Module, instruction: str, use_cache: bool = True) -> list[int]:
        """Greedy decoding of one instruction: ``generate_batch`` of one, by a model of one run."""
        return self.generate_batch(model, [instruction], use_cache)[0][0]

    def generate_batch(self, model: nn.Module, instructions: list[str],
                       use_cache: bool = True) -> list[list[list[int]]]:
        """Greedy decoding of many instructions by every run of ``model`` (K for a ``MultiLoRAModel``, else one),
        one forward call per new token for all of them: ``result[run][i]`` holds instruction i's new tokens, up to
        EOS or ``generation_tokens``. Works through every wrapper's plain forward (PEFT, BT-LoRA).

        Prompts are padded on the left, masked, and positioned from their own first token, so each row decodes what
        it would alone (tested). With ``use_cache`` the prompts run once and each step feeds one position per row
        with the key/value cache; without it every step reruns the whole sequences (same tokens, slower). A row that
        reached EOS keeps being fed its own argmax (attention never crosses rows) until every row has."""
        device = model_device(model)
        runs = run_count(model)
        forward = getattr(model, "forward_rows", model)  # a multi-run model's, even with one run, takes rows as given
        prompts = [self.prompt_ids(instruction) for instruction in instructions]
        width = max(map(len, prompts))
        sequences = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts]).repeat(runs, 1)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]).repeat(runs, 1)
        new: list[list[int]] = [[] for _ in range(len(sequences))]
        finished = [False] * len(sequences)
        past = None
        with _evaluation(device, self.precision):
            for _ in range(self.generation_tokens):
                fed = sequences[:, -1:] if past is not None else sequences
                positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -fed.shape[1]:]
                inputs = to_device({"input_ids": fed, "attention_mask": mask, "position_ids": positions}, device)
                output = forward(**inputs, past_key_values=past, use_cache=use_cache, logits_to_keep=1)
                past = output.past_key_values if use_cache else None
                tokens = output.logits[:, -1].argmax(-1).cpu()
                for row, token in enumerate(tokens.tolist()):
                    if not finished[row]:
                        finished[row] = token == self.tokenizer.eos_token_id
                        new[row] += [] if finished[row] else [token]
                if all(finished):
                    break
                sequences = torch.cat([sequences, tokens[:, None]], 1)
                mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=mask.dtype)], 1)
        return [new[run * len(prompts):(run + 1) * len(prompts)] for run in range(runs)]


def run_count(model: nn.Module) -> int:
    """How many runs a model holds: K for a ``MultiLoRAModel``, 1 for any other."""
    return getattr(model, "run_count", 1)


def _normalized(text: str) -> str:
    """Text compared for exact match: surrounding and repeated whitespace do not count, everything else does."""
    return " ".join(text.split())


def rouge_l(candidate: list, reference: list) -> float:
    """ROUGE-L F1: from the longest common subsequence of two token sequences."""
    if not candidate or not reference:
        return 0.0
    previous = [0] * (len(reference) + 1)
    for item in candidate:
        current = [0]
        for j, other in enumerate(reference):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)


Task = ClassificationTask | InstructionTask


def _right_pad(rows: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Token-id rows padded on the right to the longest one, with the attention mask of the real tokens."""
    width = max(map(len, rows))
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows]),
    }


@contextmanager
def _evaluation(device: torch.device, precision: str) -> Iterator[None]:
    """No autograd at all (inference mode), computing in the task's precision."""
    with torch.inference_mode(), autocast_for(device, precision):
        yield


def _check_nonempty(examples: list[dict], where: str) -> None:
    if not examples:
        raise FedP2EFTError(f"{where} is empty; every client needs at least one example")


def iterate_batches(
    examples: list[dict], collate, batch_size: int, shuffle_seed: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in order, or in an order drawn from ``shuffle_seed`` (deterministic per seed)."""
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]])


# Cost of one extra forward(+backward) call on the CPU, in padded tokens: measured on multilingual-e5-small with
# one thread (about 55 ms per call against 1.6 ms per token; docs/method.md, "Speed"). On a GPU a call is cheap
# and large batches are what it is good at, so batches are never split there.
CPU_CALL_COST_TOKENS = 32


def length_groups(
    batch: dict[str, torch.Tensor], loss_units, device: torch.device
) -> list[tuple[dict[str, torch.Tensor], float]]:
    """Split a right-padded batch into groups of rows of similar length, each cut to its own longest row, with the
    share of the batch's mean loss each group carries (``loss_units``: per-row weights).

    The sum over groups of ``share * group loss`` equals the batch's mean loss, so accumulating the groups'
    gradients gives the batch's gradient (to float rounding; only dropout masks are drawn differently). On the
    CPU this skips the padding that short sentences in a batch with one long sentence would otherwise pay for:
    rows are sorted by length and cut into the contiguous groups that minimise padded tokens plus
    ``CPU_CALL_COST_TOKENS`` per group. Groups without loss units (e.g. fully truncated responses) are dropped;
    they add nothing to the mean."""
    mask = batch["attention_mask"]
    units = loss_units(batch).to(torch.float64)
    total = float(units.sum())
    if device.type != "cpu" or total == 0 or len(mask) == 1:
        return [(batch, 1.0)]
    width = mask.shape[1]
    ends = width - mask.flip(1).int().argmax(1)  # one past each row's last real token (0-padded rows: width)
    ends = torch.where(mask.any(1), ends, torch.ones_like(ends))
    order = torch.argsort(ends, stable=True)
    lengths = ends[order].tolist()
    # best[j]: least cost of the first j sorted rows; cut[j]: where that solution's last group starts
    best, cut = [0.0] + [float("inf")] * len(lengths), [0] * (len(lengths) + 1)
    for j in range(1, len(lengths) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[j - 1] + CPU_CALL_COST_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], len(lengths)
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    groups = []
    for start, stop in reversed(bounds):
        rows = order[start:stop]
        share = float(units[rows].sum()) / total
        if share == 0:
            continue
        keep = lengths[stop - 1]
        groups.append(({key: value[rows][:, :keep] if value.dim() == 2 and value.shape[1] == width else value[rows]
                        for key, value in batch.items()}, share))
    return groups
