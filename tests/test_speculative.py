"""Speculative decoding: greedy output identical to the target's, sampling distributed as the target's."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import invoke, tiny_model, write_json
from lmflow_plugins.speculative import speculative_generate
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmflow_core.generate import GenerationOptions
from lmflow_core.inference import open_session


def llama(vocab: int, hidden: int, layers: int, seed: int, dtype=torch.float64):
    """A tiny Llama whose last token id is its EOS, in ``dtype``."""
    return tiny_model(
        "llama",
        seed=seed,
        dtype=dtype,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        eos_token_id=vocab - 1,
        pad_token_id=0,
        bos_token_id=None,
    )


@pytest.fixture(scope="module")
def demo_tokenizer():
    from lmflow_core.demo import demo_model_dir

    return AutoTokenizer.from_pretrained(demo_model_dir())


def test_greedy_output_is_the_targets_own_on_many_prompts(demo_tokenizer):
    vocab = len(demo_tokenizer)
    target = llama(vocab, 64, 3, seed=1)
    # A draft that often agrees (a noisy copy of the target) and one that rarely does (a small random model):
    # together they exercise acceptance, rejection and both cache rollbacks.
    noisy = llama(vocab, 64, 3, seed=1)
    with torch.no_grad():
        for parameter in noisy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.001)
    drafts = [noisy, llama(vocab, 32, 1, seed=2)]
    rng = random.Random(0)
    accepted = proposed = 0
    for trial in range(60):
        draft = drafts[trial % 2]
        prompt = torch.tensor([[rng.randrange(vocab - 1) for _ in range(rng.randint(1, 12))]])
        options = GenerationOptions(
            max_new_tokens=rng.randint(1, 24), repetition_penalty=rng.choice([1.0, 1.3])
        )
        k = rng.randint(1, 6)
        ours = speculative_generate(target, draft, demo_tokenizer, prompt, options, None, k)
        theirs = target.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=options.max_new_tokens,
            repetition_penalty=options.repetition_penalty,
            eos_token_id=demo_tokenizer.eos_token_id,
            pad_token_id=demo_tokenizer.pad_token_id,
        )
        assert ours.tolist() == theirs.tolist(), trial
        accepted += options.stats["accepted_tokens"]
        proposed += options.stats["draft_tokens"]
    assert 0.2 * proposed < accepted < 0.9 * proposed, (accepted, proposed)


def test_a_draft_that_is_the_target_accepts_everything(demo_tokenizer):
    target = llama(len(demo_tokenizer), 64, 2, seed=3)
    options = GenerationOptions(max_new_tokens=20)
    speculative_generate(target, target, demo_tokenizer, torch.tensor([[5, 6, 7]]), options, None, 4)
    assert options.stats["acceptance_rate"] == 1.0 and options.stats["draft_tokens"] > 0


@pytest.mark.slow
def test_sampling_follows_the_targets_distribution():
    """Two tokens sampled 6000 times on an 8-token vocabulary: a chi-square test against the exact target
    distribution passes, and the same test rejects the draft's own distribution."""
    from scipy.stats import chisquare

    vocab = 8
    target = llama(vocab, 16, 1, seed=11)
    draft = llama(vocab, 16, 1, seed=11)
    with torch.no_grad():
        # Peaked distributions (a random init is nearly uniform); the draft's differ from the target's enough
        # to be rejected about half the time.
        for model in (target, draft):
            model.lm_head.weight.mul_(40)
        generator = torch.Generator().manual_seed(5)
        draft.lm_head.weight.add_(
            torch.randn(draft.lm_head.weight.shape, generator=generator, dtype=torch.float64) * 0.5
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer(vocab))
    prompt = torch.tensor([[1, 2, 3]])
    options = GenerationOptions(max_new_tokens=2, greedy=False, temperature=1.3, top_k=0, top_p=1.0)

    def pair_probabilities(model):
        with torch.no_grad():
            first = torch.softmax(model(prompt).logits[0, -1] / 1.3, -1)
            table = torch.zeros(vocab, vocab, dtype=torch.float64)
            for a in range(vocab):
                second = torch.softmax(
                    model(torch.cat([prompt, torch.tensor([[a]])], 1)).logits[0, -1] / 1.3, -1
                )
                table[a] = first[a] * second
        return table.flatten()

    expected_target, expected_draft = pair_probabilities(target), pair_probabilities(draft)
    torch.manual_seed(0)
    counts = torch.zeros(vocab * vocab)
    samples = 6000
    accepted = proposed = 0
    for _ in range(samples):
        out = speculative_generate(target, draft, tokenizer, prompt, options, None, 2)[0, 3:].tolist()
        accepted, proposed = (
            accepted + options.stats["accepted_tokens"],
            proposed + options.stats["draft_tokens"],
        )
        if len(out) == 1:  # the first token was EOS (id 7): sequence ends
            out = [out[0], vocab - 1]
        counts[out[0] * vocab + out[1]] += 1
    # Pairs starting with EOS end early: fold their second token into one outcome each.
    observed, target_p, draft_p = (
        _fold_eos(counts, vocab),
        _fold_eos(expected_target, vocab),
        _fold_eos(expected_draft, vocab),
    )
    keep = target_p * samples >= 5
    assert (
        chisquare(observed[keep], target_p[keep] / target_p[keep].sum() * observed[keep].sum()).pvalue > 1e-3
    )
    keep_d = draft_p * samples >= 5
    assert (
        chisquare(observed[keep_d], draft_p[keep_d] / draft_p[keep_d].sum() * observed[keep_d].sum()).pvalue
        < 1e-6
    )
    assert 0.3 < accepted / proposed < 0.8


def _fold_eos(values, vocab):
    import numpy as np

    values = np.asarray(values, dtype=np.float64).reshape(vocab, vocab)
    eos = vocab - 1
    rows = [values[a] for a in range(vocab) if a != eos]
    return np.concatenate([*rows, [values[eos].sum()]])


def _word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, demo_tokenizer):
    tmp = tmp_path_factory.mktemp("spec")
    for name, (hidden, layers, seed) in {"target": (64, 3, 1), "draft": (32, 1, 2)}.items():
        model = llama(len(demo_tokenizer), hidden, layers, seed, dtype=torch.float32)
        model.save_pretrained(tmp / name)
        demo_tokenizer.save_pretrained(tmp / name)
    (tmp / "target" / "lmflow_run.json").write_text('{"template": "chatml"}')
    return tmp


def test_generate_with_the_plugin_matches_plain_generation_and_reports_acceptance(
    runner, two_models, tmp_path
):
    messages = write_json(tmp_path / "m.json", [{"role": "user", "content": "Hello there"}])
    plain = invoke(
        runner, "generate", two_models / "target", "--messages", messages, "--max-new-tokens", "20"
    )
    fast = invoke(
        runner,
        "generate",
        two_models / "target",
        "--messages",
        messages,
        "--max-new-tokens",
        "20",
        "--plugins",
        "speculative",
        "--draft-model",
        two_models / "draft",
        "--num-draft-tokens",
        "3",
    )
    assert plain.exit_code == fast.exit_code == 0, fast.stderr
    assert fast.stdout == plain.stdout
    assert "acceptance_rate:" in fast.stderr


def test_a_draft_with_another_vocabulary_is_refused(runner, two_models, tmp_path):
    other = llama(100, 16, 1, seed=5, dtype=torch.float32)
    other.save_pretrained(tmp_path / "other")
    result = invoke(
        runner,
        "generate",
        two_models / "target",
        "--prompt",
        "hi",
        "--plugins",
        "speculative",
        "--draft-model",
        tmp_path / "other",
    )
    assert result.exit_code == 1
    assert "the draft model's vocabulary (100 tokens) differs from the target's" in result.stderr
    missing = invoke(runner, "generate", two_models / "target", "--prompt", "hi", "--plugins", "speculative")
    assert missing.exit_code == 2 and "needs a draft model: pass --draft-model" in missing.stderr


def test_speculative_options_appear_once_the_plugin_is_named(runner):
    assert "--draft-model" not in invoke(runner, "generate", "--help").output
    helped = invoke(runner, "generate", "--plugins", "speculative", "--help").output
    assert "--draft-model" in helped and "--num-draft-tokens" in helped


def test_session_api_with_the_plugin(two_models):
    session = open_session(
        str(two_models / "target"),
        plugins=["speculative"],
        plugin_options={"speculative": {"draft_model": str(two_models / "draft")}},
    )
    options = GenerationOptions(max_new_tokens=10)
    result = session.complete("w1 w2", options)
    assert result.stats["draft_tokens"] > 0 and hasattr(session.model, "lmflow_draft")
