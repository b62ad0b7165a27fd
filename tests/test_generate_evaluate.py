"""The core's default `decode` and `evaluate`, checked against direct computations with the model."""

from __future__ import annotations

import math

import torch
from helpers import conversations, write_json
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmflow_core import defaults
from lmflow_core.catalog import get_template
from lmflow_core.data import load_raw_dataset, tokenize_dataset
from lmflow_core.generate import GenerationOptions, generate_ids, reply
from lmflow_core.plugins import select_plugins
from lmflow_core.templates import Conversation


def test_default_decode_equals_greedy_generate(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    hook = select_plugins([]).hook
    ids = tokenizer("What is", return_tensors="pt")["input_ids"]
    new = generate_ids(hook, model, tokenizer, ids, GenerationOptions(max_new_tokens=8))
    expected = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    assert new.tolist() == expected[0, ids.shape[1] :].tolist()


def test_sampling_with_a_seed_is_reproducible(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    hook = select_plugins([]).hook
    ids = tokenizer("What is", return_tensors="pt")["input_ids"]
    options = GenerationOptions(max_new_tokens=10, greedy=False, temperature=1.5, seed=3)
    assert (
        generate_ids(hook, model, tokenizer, ids, options).tolist()
        == generate_ids(hook, model, tokenizer, ids, options).tolist()
    )


def test_reply_is_cut_at_the_template_end_of_turn(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    result = reply(
        select_plugins([]).hook,
        model,
        tokenizer,
        get_template("chatml"),
        Conversation.from_messages([{"role": "user", "content": "Hi"}]),
        GenerationOptions(max_new_tokens=6),
    )
    assert "<|im_end|>" not in result.text and "<|im_start|>" not in result.text
    assert result.completion_tokens <= 6 and result.finish_reason in ("stop", "length")


def test_default_evaluate_matches_a_direct_computation(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    template = get_template("chatml")
    raw = load_raw_dataset(write_json(tmp_path / "c.json", conversations(5)), template)
    data, _ = tokenize_dataset(raw, tokenizer, 128, template, use_cache=False)

    class Cfg:
        eval_batch_size = 2
        batch_size = 2
        block_size = None
        eval_stride = None

    metrics = defaults.evaluate(Cfg(), model, tokenizer, data)
    sums, counts = [], []
    with torch.no_grad():
        for example in data:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor(example["labels"])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            target = labels[1:]
            mask = target != -100
            nll = -logprobs[torch.arange(len(target))[mask], target[mask]].sum().item()
            sums.append(nll)
            counts.append(int(mask.sum()))
    assert math.isclose(metrics["nll_per_sample"], sum(sums) / len(sums), rel_tol=1e-5)
    assert math.isclose(metrics["nll_per_token"], sum(sums) / sum(counts), rel_tol=1e-5)
    assert math.isclose(metrics["perplexity"], math.exp(sum(sums) / sum(counts)), rel_tol=1e-5)
    assert metrics["eval_samples"] == 5 and metrics["eval_tokens"] == sum(counts)
