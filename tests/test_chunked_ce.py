"""chunked_ce: the LM head and the loss a chunk of tokens at a time, equal to plain transformers training."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from helpers import TINY_SHAPES, assert_one_line_error, invoke, save_tiny_model, tiny_model
from lmflow_plugins import chunked_ce

import lmflow_core
from lmflow_core import hookimpl

VOCAB = 101
DECODER = dict(TINY_SHAPES["llama"])  # the tiny decoder shape, for the families without a default one
# Every supported family, tied and untied heads, Gemma 2's final-logit softcapping.
FAMILIES = {
    "llama": {},
    "llama-tied": {"model_type": "llama", "tie_word_embeddings": True},
    "qwen2": DECODER,
    "qwen3": {**DECODER, "head_dim": 8},
    "mistral": DECODER,
    "phi3": {**DECODER, "pad_token_id": 0},
    "gemma": {**DECODER, "head_dim": 8},
    "gemma2": {**DECODER, "head_dim": 8, "final_logit_softcapping": 3.0},
    "gemma3_text": {**DECODER, "head_dim": 8, "final_logit_softcapping": 3.0},
    "gpt2": {"bos_token_id": 0, "eos_token_id": 0},
}


def family_model(name: str, **extra):
    overrides = dict(FAMILIES[name])
    model_type = overrides.pop("model_type", name)
    model = tiny_model(model_type, vocab_size=VOCAB, **{**overrides, **extra}).train()
    if overrides.get("final_logit_softcapping"):
        with torch.no_grad():  # logits large enough for the softcapping to matter
            model.get_output_embeddings().weight.mul_(100)
    return model


def plain_and_chunked(model, chunk_size: int):
    chunked = copy.deepcopy(model)
    chunked_ce.install(chunked, chunked_ce.ChunkedState(chunk_size))
    return model, chunked


def batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 13), generator=generator)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[2, 9:] = -100  # padding
    return ids, labels


def loss_and_grads(model, **inputs):
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout masks in both models (GPT-2)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(plain, chunked, **inputs):
    expected, expected_grads = loss_and_grads(plain, **inputs)
    got, grads = loss_and_grads(chunked, **inputs)
    assert got.logits is None
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=0)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in expected_grads.items():
        scale = grad.abs().max().item()
        assert (grads[name] - grad).abs().max().item() <= 1e-5 * scale + 1e-12, name
    return expected.loss.item()


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_every_gradient_equal_plain_training(family):
    plain, chunked = plain_and_chunked(family_model(family), chunk_size=7)
    ids, labels = batch()
    mean = assert_same(plain, chunked, input_ids=ids, labels=labels)
    # Gradient accumulation: the trainer passes the tokens of the whole optimizer step.
    summed = assert_same(plain, chunked, input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(40))
    scored = int((labels[:, 1:] != -100).sum())
    assert summed == pytest.approx(mean * scored / 40, rel=1e-5)


def test_softcapping_is_applied_per_chunk():
    capped = family_model("gemma2")
    assert capped.config.final_logit_softcapping == 3.0
    ids, labels = batch()
    with torch.no_grad():
        loss = chunked_ce.chunked_causal_lm_loss(
            capped.model(input_ids=ids).last_hidden_state, capped.lm_head, labels, chunk_size=5, softcap=3.0
        )
        uncapped = chunked_ce.chunked_causal_lm_loss(
            capped.model(input_ids=ids).last_hidden_state, capped.lm_head, labels, chunk_size=5
        )
        expected = capped(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert abs(uncapped.item() - expected.item()) > 1e-3


def test_shift_labels_chunk_sizes_and_a_fully_masked_row():
    plain, chunked = plain_and_chunked(family_model("llama"), chunk_size=1)
    ids, labels = batch()
    labels[1] = -100
    assert_same(plain, chunked, input_ids=ids, labels=labels)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    for size in (4, 39, 1000):
        chunked_ce.install(chunked, chunked_ce.ChunkedState(size))
        assert_same(plain, chunked, input_ids=ids, labels=labels, shift_labels=shifted)


def test_bf16_upcasts_each_chunk_as_transformers_does():
    plain, chunked = plain_and_chunked(family_model("qwen2", dtype=torch.bfloat16), chunk_size=8)
    ids, labels = batch()
    expected, expected_grads = loss_and_grads(plain, input_ids=ids, labels=labels)
    got, grads = loss_and_grads(chunked, input_ids=ids, labels=labels)
    assert got.loss.dtype == torch.float32 == expected.loss.dtype
    torch.testing.assert_close(got.loss, expected.loss, rtol=2e-3, atol=0)
    for name, grad in expected_grads.items():
        assert grads[name].dtype == torch.bfloat16
        torch.testing.assert_close(
            grads[name].float(), grad.float(), rtol=0.05, atol=0.02 * grad.abs().max().item()
        )


def test_lora_on_the_head_and_beside_it():
    from peft import LoraConfig, get_peft_model

    for targets, saved in ((["q_proj", "v_proj", "lm_head"], None), (["q_proj"], ["lm_head"])):
        base = family_model("llama")
        config = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, modules_to_save=saved
        )
        torch.manual_seed(0)
        plain = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():  # non-zero B matrices, so every adapter weight has a gradient
            for name, param in plain.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
        chunked = copy.deepcopy(plain)
        chunked_ce.install(chunked.get_base_model(), chunked_ce.ChunkedState(5))
        ids, labels = batch()
        assert_same(plain, chunked, input_ids=ids, labels=labels)
        trained = [n for n, p in chunked.named_parameters() if p.requires_grad]
        assert any("lm_head" in n for n in trained)


@pytest.mark.parametrize("hooked", [False, True], ids=["bare-linear-head", "hooked-head"])
def test_the_loss_never_sees_more_than_a_chunk_of_logits(monkeypatch, hooked):
    """Both ways through the head: a bare nn.Linear (products taken directly) and a module called as it is."""
    plain, chunked = plain_and_chunked(family_model("gemma2"), chunk_size=6)
    head_calls = []
    if hooked:
        chunked.lm_head.register_forward_hook(lambda module, inputs, output: head_calls.append(output.shape))
    assert chunked_ce._plain_linear(chunked.lm_head) is not hooked
    seen = []
    real = torch.nn.functional.cross_entropy

    def recording(logits, *args, **kwargs):
        seen.append(tuple(logits.shape))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recording)
    ids, labels = batch()
    assert_same(plain, chunked, input_ids=ids, labels=labels)
    plain_shapes, chunked_shapes = seen[:1], seen[1:]
    assert plain_shapes == [(39, VOCAB)]
    assert [rows for rows, _ in chunked_shapes] == [6] * 6 + [3]
    assert [shape[-2] if len(shape) > 2 else shape[0] for shape in head_calls] == (
        [6] * 6 + [3] if hooked else []
    )


def test_evaluation_and_generation_get_the_models_own_logits():
    plain = family_model("llama")
    chunked = copy.deepcopy(plain)
    ids, labels = batch()
    state = chunked_ce.ChunkedState(4)
    chunked_ce.install(chunked, state)
    with torch.no_grad():
        without_labels = chunked(input_ids=ids)
        torch.testing.assert_close(without_labels.logits, plain(input_ids=ids).logits)
        plain.eval(), chunked.eval()
        evaluated = chunked(input_ids=ids, labels=labels)
        torch.testing.assert_close(evaluated.logits, plain(input_ids=ids, labels=labels).logits)
        torch.testing.assert_close(evaluated.loss, plain(input_ids=ids, labels=labels).loss)
        generated = chunked.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
        assert torch.equal(generated, plain.generate(ids[:1, :4], max_new_tokens=5, do_sample=False))
    assert state.chunked_forwards == 0


# --------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------


def head_probe(shapes: list):
    """A plugin recording the token count of every LM head call made while training."""

    @hookimpl
    def prepare_model(model):
        head = model.get_output_embeddings()

        def record(module, inputs, output):
            if module.training:
                shapes.append(tuple(output.shape))

        head.register_forward_hook(record)

    return types.SimpleNamespace(__name__="head_probe", prepare_model=prepare_model)


def run(tiny_llama, chat_data, out, **settings):
    return lmflow_core.run(
        model=str(tiny_llama),
        dataset=str(chat_data),
        template="chatml",
        output_dir=str(out),
        max_steps=3,
        batch_size=4,
        logging_steps=1,
        learning_rate=1e-3,
        save_steps=0,
        **settings,
    )


def assert_same_losses(got, expected, rel=1e-5):
    assert [step for step, _ in got] == [step for step, _ in expected] == [1, 2, 3]
    for (_, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, rel=rel)


@pytest.fixture(scope="module")
def plain_losses(tiny_llama, tmp_path_factory):
    from helpers import conversations, write_json

    tmp = tmp_path_factory.mktemp("plain")
    data = write_json(tmp / "chat.json", {"type": "conversation", "instances": conversations()})
    return data, run(tiny_llama, data, tmp / "out").losses


def test_a_run_matches_a_plain_run_step_for_step_with_at_most_one_chunk_of_logits(
    tiny_llama, plain_losses, tmp_path
):
    data, expected = plain_losses
    shapes: list = []
    result = run(
        tiny_llama,
        data,
        tmp_path / "out",
        plugins=["chunked_ce"],
        chunked_ce={"chunk_size": 16},
        extra_plugins={"head_probe": head_probe(shapes)},
    )
    assert_same_losses(result.losses, expected)
    assert len(shapes) > 3 * 2  # several chunks per step
    assert max(shape[0] for shape in shapes) <= 16  # tokens of one call: never more than a chunk
    # The saved model is a plain one.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").forward.__qualname__.startswith("Llama")


def test_the_cli_run_matches_a_plain_run(tiny_llama, plain_losses, runner, tmp_path):
    data, expected = plain_losses
    result = invoke(
        runner,
        "run",
        "--model", tiny_llama,
        "--dataset", data,
        "--template", "chatml",
        "--output-dir", tmp_path / "out",
        "--max-steps", "3",
        "--batch-size", "4",
        "--logging-steps", "1",
        "--learning-rate", "1e-3",
        "--save-steps", "0",
        "--plugins", "chunked_ce",
        "--chunked-ce-chunk-size", "16",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "chunked_ce: logits of 16 tokens at a time" in result.output + result.stderr
    record = json.loads((tmp_path / "out" / "lmflow_run.json").read_text())
    assert_same_losses([tuple(pair) for pair in record["result"]["losses"]], expected)


@pytest.mark.parametrize(
    "settings",
    [
        {"plugins": ["chunked_ce"], "packing": True, "grad_accum": 2, "gradient_checkpointing": True},
        pytest.param({"plugins": ["chunked_ce", "lora"]}, marks=pytest.mark.slow),
        pytest.param(
            {"plugins": ["lisa", "chunked_ce"], "lisa": {"activated_layers": 1, "interval_steps": 1}},
            marks=pytest.mark.slow,
        ),
        pytest.param(
            {"plugins": ["chunked_ce"], "bf16": True, "gradient_checkpointing": True}, marks=pytest.mark.slow
        ),
    ],
    ids=["packing-accumulation-checkpointing", "lora", "lisa", "bf16-checkpointing"],
)
def test_runs_compose_with_packing_accumulation_checkpointing_lora_and_lisa(
    tiny_llama, chat_data, tmp_path, settings
):
    plugins = settings.pop("plugins")
    plain = [name for name in plugins if name != "chunked_ce"]
    expected = run(tiny_llama, chat_data, tmp_path / "plain", plugins=plain, **settings).losses
    got = run(
        tiny_llama, chat_data, tmp_path / "chunked", plugins=plugins, chunked_ce={"chunk_size": 8}, **settings
    ).losses
    # bf16: the body's rounding differs with the order of the head's gradient sums.
    assert_same_losses(got, expected, rel=1e-3 if settings.get("bf16") else 1e-5)


def test_an_unsupported_family_is_refused_before_the_model_loads(runner, chat_data, tmp_path, model_loads):
    opt = save_tiny_model(
        "opt",
        tmp_path / "opt",
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
    )
    model_loads.clear()
    result = invoke(
        runner, "run", "--model", opt, "--dataset", chat_data, "--template", "chatml",
        "--output-dir", tmp_path / "out", "--plugins", "chunked_ce",
    )  # fmt: skip
    assert_one_line_error(result, "chunked_ce does not support opt models", "llama", "gpt2", "gemma2")
    assert model_loads == []


@pytest.mark.parametrize("engine", ["zero3", "zero2", "fsdp"])
def test_sharding_engines_are_refused_with_the_reason(runner, fast_run_args, engine, model_loads):
    result = invoke(runner, *fast_run_args, "--plugins", f"chunked_ce,{engine}")
    error = assert_one_line_error(result, "chunked_ce", engine)
    assert "gradient" in error
    assert model_loads == []


@pytest.mark.slow
def test_two_processes_with_chunked_ce_match_one_plain_process(tiny_llama, chat_data, tmp_path):
    """DDP: the head's gradients, taken chunk by chunk, are averaged like every other gradient."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    def lmflow(out, batch_size, *extra):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("LOCAL_RANK", None)
        args = [
            "run", "--model", tiny_llama, "--dataset", chat_data, "--template", "chatml", "--max-steps", 3,
            "--batch-size", batch_size, "--learning-rate", "1e-3", "--logging-steps", 1, "--save-steps", 0,
            "--output-dir", out, *extra,
        ]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "lmflow_core.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads((out / "lmflow_run.json").read_text())["result"]["losses"]

    single = lmflow(tmp_path / "single", 8)
    double = lmflow(
        tmp_path / "ddp", 4, "--nproc", 2, "--plugins", "chunked_ce", "--chunked-ce-chunk-size", 8
    )
    for (_, a), (_, b) in zip(single, double):
        assert abs(a - b) < 1e-4
    reference = load_file(str(tmp_path / "single" / "model.safetensors"))
    weights = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    assert max((reference[k] - weights[k]).abs().max().item() for k in reference) < 1e-5
