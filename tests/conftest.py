"""Shared fixtures: tiny randomly initialised BERT-like and Llama-like models, a word-level tokenizer built
offline, small learnable toy tasks, a finished toy Flower simulation reused by the Flower tests, and one finished run of the
quick benchmark profile shared by every test that needs a run folder (it is the suite's most expensive fixture)."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedp2eft.core.modeling import classifier_from_config
from fedp2eft.core.tasks import ClassificationTask, InstructionTask

FILLER = "the a one some very quite really just then now here there it this that we you".split()
KEYWORDS = {0: ["cat", "kitten", "meow"], 1: ["dog", "puppy", "bark"], 2: ["bird", "wing", "tweet"]}
LABELS = ["cats", "dogs", "birds"]
ANSWERS = {"sun": "yellow", "sky": "blue", "grass": "green", "snow": "white"}


def _vocabulary() -> list[str]:
    words = FILLER + [w for ws in KEYWORDS.values() for w in ws] + list(ANSWERS) + list(ANSWERS.values())
    words += "###instruction: response: color of what is".split()
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"] + sorted(set(words))


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: index for index, word in enumerate(_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", cls_token="[CLS]",
        sep_token="[SEP]",
    )


SHARED_RUNS = ("quick_run", "full_toy_run")  # session fixtures that tests of several files read
MAX_WORKERS = 4  # pytest-xdist's `-n auto` at most: each worker holds torch, a model and Ray clusters (~2-3 GB)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker's torch would take every core for its own threads, so two workers on two cores
    run four threads and every test slows down; a worker takes its share of the cores instead."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """pytest-xdist (`-n auto`, README) sends each test file whole to one worker (its module fixtures: a finished
    Flower run, a loopback federation, Gemma), and every file that reads a shared session run (``SHARED_RUNS``) to
    the same worker, so that no worker builds one again. (xdist's own `loadgroup` marks cannot do it under pytest 9:
    they rename a node id attribute that pytest 9 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    folder = Path(__file__).parent
    shared = {f"tests/{path.name}": name for path in sorted(folder.glob("test_*.py"))
              for name in SHARED_RUNS if name in path.read_text()}

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::")[0]
            return shared.get(file, file)

    return SharedRunScheduling(config, log)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def bert_config(vocab_size: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                       pad_token_id=0, eos_token_id=4, bos_token_id=2, initializer_range=0.3)


# Float32's relative rounding (2^-23 ~ 1.2e-7) times a cancellation allowance of ~8,000: a gradient summed in
# another order (length groups, a batched pass) differs from itself by eps x (sum of |terms| / |sum|), and for a
# weight whose gradient nearly cancels that ratio is large.
ROUNDING_DIRECTION = 1e-3


def adam_rounding_tolerance(lr: float, steps: int) -> float:
    """Largest per-weight difference that float rounding alone may leave between two Adam(W) trainings of the same
    weights whose gradients were summed in a different order.

    Adam divides the first moment by the root of the second, so every update is about ``lr`` in size whatever the
    gradient's scale; rounding does not shrink it, it tilts its direction, by the gradient's relative rounding
    error (``ROUNDING_DIRECTION``). Over ``steps`` updates that adds up to at most ``lr * steps * 1e-3``: 25x the
    largest difference seen on any CPU (1.65e-5 for AdaLoRA at lr 5e-2 over 8 steps on an AMD EPYC), while a
    wrong gradient moves weights by a sizeable share of ``lr`` per step."""
    return lr * steps * ROUNDING_DIRECTION


# A loss read after training (a mean over the last epoch, a validation loss after an update) is computed at weights
# that rounding has moved by up to ``adam_rounding_tolerance`` each, and to first order it moves by its gradient times
# that drift: about 1e-4 of the loss on the tiny models (2.0e-4 seen on one CPU for a Llama-like run batched with
# eleven others). 1e-3 relative leaves a margin of 5x on any CPU, while an error in what is trained or scored (another
# run's rows, a lost mask, a wrong mean) moves such a loss by whole percents.
TRAINED_LOSS_REL = 1e-3


def classification_examples(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        label = rng.randrange(len(LABELS))
        words = rng.sample(FILLER, rng.randint(2, 6)) + [rng.choice(KEYWORDS[label])]
        rng.shuffle(words)
        examples.append({"text": " ".join(words), "label": label})
    return examples


def instruction_examples(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"instruction": f"what is the color of {thing}", "response": ANSWERS[thing]}
        for thing in (rng.choice(list(ANSWERS)) for _ in range(count))
    ]


@pytest.fixture(params=["bert", "llama"])
def model_kind(request) -> str:
    return request.param


@pytest.fixture
def setup(model_kind, tokenizer):
    """(base model, task, train examples, test examples) for a tiny random model of the given kind:
    a BERT-like classifier or a Llama-like causal LM doing instruction tuning."""
    torch.manual_seed(0)
    if model_kind == "bert":
        model = classifier_from_config(bert_config(len(tokenizer)), LABELS)
        task = ClassificationTask(tokenizer, LABELS, max_length=32)
        return model, task, classification_examples(48, seed=1), classification_examples(24, seed=2)
    model = LlamaForCausalLM(llama_config(len(tokenizer)))
    task = InstructionTask(tokenizer, max_length=32)
    return model, task, instruction_examples(48, seed=1), instruction_examples(16, seed=2)


# --- Flower --------------------------------------------------------------------------------------------------

TOY_CONFIG = {"num_clients": 4, "dim": 6, "hidden": 8, "local_steps": 3, "seed": 7}
FULL_ROUNDS = 3
CLIENTS_PER_ROUND = 3


def npy_bytes(weights: dict[str, torch.Tensor]) -> int:
    """What ``ArrayRecord.count_bytes()`` should report, computed without Flower: each tensor as a NumPy .npy blob
    plus its name."""
    total = 0
    for name, tensor in weights.items():
        buffer = io.BytesIO()
        np.save(buffer, tensor.numpy(), allow_pickle=False)
        total += len(buffer.getvalue()) + len(name)
    return total


@pytest.fixture(scope="session")
def full_toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output dir of an uninterrupted 3-round run of the toy task in the Ray simulation."""
    from fedp2eft.fl.simulation import run_federated

    out = tmp_path_factory.mktemp("full")
    run_federated("toy", TOY_CONFIG, FULL_ROUNDS, CLIENTS_PER_ROUND, output_dir=out, min_clients=2, seed=11)
    return out


@pytest.fixture(scope="session", autouse=True)
def fedp2eft_cache(tmp_path_factory: pytest.TempPathFactory):
    """A session-wide $FEDP2EFT_CACHE, so tests never write to ~/.cache and the e5 conversion and
    benchmark builds happen once per run."""
    root = tmp_path_factory.mktemp("fedp2eft-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDP2EFT_CACHE", str(root))
        yield root


@pytest.fixture(autouse=True)
def environment_per_test():
    """``fedp2eft.cli.main`` sets environment variables for the processes a command starts (``fedp2eft.logs``); they
    stay within the test that ran it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> Path:
    """``fedp2eft benchmark --config quick`` on the embedded model and data, once per test session, in float32:
    its readers check rows reproduced by other code paths (the ``personalize`` command's single PEFT run) to float32
    rounding, and ``precision: auto`` would pick bf16 on some CPUs and not on others."""
    from fedp2eft.cli import main

    results = tmp_path_factory.mktemp("results")
    assert main(["benchmark", "--config", "quick", "--results", str(results), "precision=fp32"]) == 0
    return results / "quick"
