"""The LLM protocol end to end (profile llm-quick) on a tiny random decoder instead of the embedded Gemma, so it runs
in seconds: instruction data from intents-chat, FedAvg-LoRA base, PS generator, FedL2P, every method, and a report
that scores greedy generations by ROUGE-L and exact match."""

import csv
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import llama_config, make_tokenizer
from fedp2eft.benchmark.config import resolve
from fedp2eft.cli import main


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    decoder = tmp_path_factory.mktemp("decoder")
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(len(tokenizer))).save_pretrained(decoder)
    tokenizer.save_pretrained(decoder)
    results = tmp_path_factory.mktemp("results")
    assert main(["benchmark", "--config", "llm-quick", "--results", str(results), f"model={decoder}"]) == 0
    return results / "llm-quick"


def test_llm_quick_scores_generations_for_every_method(llm_run):
    config = resolve("llm-quick", [])
    results = json.loads((llm_run / "results.json").read_text())
    assert results["metric"] == "rouge_l" and set(results["other_metrics"]) == {"exact_match", "token_accuracy"}
    settings = {(row["pool"], row["method"], row["budget"]) for row in results["summary"]}
    expected = {(p, m, b) for p in config["pools"] for m in config["methods"] for b in config["budgets"]}
    assert settings == expected | {(p, "base", 0) for p in config["pools"]}
    assert all(0.0 <= row["ci_low"] <= row["mean"] <= row["ci_high"] <= 1.0 for row in results["summary"])
    report = (llm_run / "report.md").read_text()
    assert "## ROUGE-L F1 by budget" in report and "## Exact match by budget" in report
    assert "Does FedP²EFT win?" in report and "tokenizer tokens" in report
    records = [json.loads(line) for line in (llm_run / "personalize.jsonl").read_text().splitlines()]
    for record in records:
        for row in record["rows"]:
            rouge, count = row["scores"]["rouge_l"]
            assert count == config["dataset_options"]["test_size"] and 0 <= rouge <= count
            assert row["scores"]["exact_match"][1] == count and row["correct"] == rouge
    with (llm_run / "results.csv").open() as handle:
        assert {"rouge_l", "exact_match", "token_accuracy"} <= set(next(csv.DictReader(handle)))
    for stage in ("seed0/psg/generator.safetensors", "seed0/fedl2p/fedl2p-r2.safetensors", "base/model/config.json"):
        assert (llm_run / stage).is_file(), stage


def test_an_encoder_with_an_instruction_dataset_stops_with_a_clear_message(capsys, tmp_path):
    code = main(["benchmark", "--config", "llm-quick", "--results", str(tmp_path), "model=multilingual-e5-small"])
    assert code != 0
    assert "not a decoder: instruction datasets need a causal language model" in capsys.readouterr().err
