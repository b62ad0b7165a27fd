"""The rope_scaling plugin: the scaled model equals transformers' own implementation of each scaling, a run trains
on blocks longer than the original context, the saved model carries the scaling into generate and evaluate,
and every user error is one line before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, invoke, save_tiny_model, tiny_model, write_json
from lmflow_plugins.rope_scaling import apply_rope_scaling
from transformers import AutoConfig, AutoModelForCausalLM

from lmflow_core import hookimpl, run
from lmflow_core.errors import LmflowError

CONTEXT = 64  # the tiny models' pretrained context
FACTOR = 4.0
SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    # Per-layer-type RoPE: only the full-attention layers are scaled, as transformers' constructor does.
    "gemma3_text": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16},
}
# What transformers documents for each scaling (RopeParameters), given to its config constructor.
REFERENCE = {
    "linear": ({"rope_type": "linear", "factor": FACTOR}, CONTEXT),
    "dynamic": ({"rope_type": "dynamic", "factor": FACTOR}, CONTEXT),
    "yarn": (
        {"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": CONTEXT},
        int(CONTEXT * FACTOR),
    ),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": FACTOR,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": CONTEXT,
        },
        int(CONTEXT * FACTOR),
    ),
}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny saved model of every RoPE family, pretrained context 64."""
    out = {}
    for family, extra in FAMILIES.items():
        path = tmp_path_factory.mktemp(family)
        tiny_model(family, **SHAPE, **extra, max_position_embeddings=CONTEXT).save_pretrained(path)
        out[family] = path
    return out


def logits(model_dir: Path, config, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("rope_type", list(REFERENCE))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_scaled_logits_equal_transformers_own_scaling(family_models, family, rope_type):
    path = family_models[family]
    ids = torch.randint(3, SHAPE["vocab_size"], (1, 3 * CONTEXT), generator=torch.Generator().manual_seed(1))

    scaled = AutoConfig.from_pretrained(path)  # a loaded config, as a run has it
    assert apply_rope_scaling(scaled, rope_type, factor=FACTOR) == rope_type
    parameters, max_positions = REFERENCE[rope_type]
    reference = AutoConfig.for_model(
        family,
        **SHAPE,
        **FAMILIES[family],
        max_position_embeddings=max_positions,
        rope_scaling=dict(parameters),
    )
    ours = logits(path, scaled, ids)
    assert torch.equal(ours, logits(path, reference, ids))
    plain = logits(path, AutoConfig.from_pretrained(path), ids)
    assert not torch.allclose(ours, plain, atol=1e-6)  # the scaling took effect
    # The extended length is the model's context from now on, except for dynamic NTK (see the core's model_context).
    assert scaled.max_position_embeddings == (CONTEXT if rope_type == "dynamic" else int(CONTEXT * FACTOR))


def test_target_context_derives_the_factor_and_the_context(family_models):
    from lmflow_core.models import model_context

    for rope_type, expected in (("yarn", 200), ("dynamic", 200), ("linear", 200)):
        config = AutoConfig.from_pretrained(family_models["llama"])
        apply_rope_scaling(config, rope_type, target_context=200)
        assert config.rope_parameters["factor"] == pytest.approx(200 / CONTEXT)
        assert model_context(config) == expected
        # dynamic NTK keeps the pretrained length, which its algorithm reads at run time
        assert config.max_position_embeddings == (CONTEXT if rope_type == "dynamic" else 200)


def test_an_already_scaled_model_keeps_its_scaling_or_is_refused(family_models):
    config = AutoConfig.from_pretrained(family_models["llama"])
    apply_rope_scaling(config, "yarn", factor=FACTOR)
    before = json.dumps(config.to_dict(), sort_keys=True, default=str)
    assert apply_rope_scaling(config, "yarn", factor=FACTOR) is None
    assert apply_rope_scaling(config, "yarn", target_context=256) is None
    assert json.dumps(config.to_dict(), sort_keys=True, default=str) == before
    with pytest.raises(LmflowError, match="already uses yarn RoPE scaling .* would scale it twice"):
        apply_rope_scaling(config, "linear", factor=2.0)


@pytest.fixture(scope="module")
def phi3_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("phi3")
    tiny_model(
        "phi3", **SHAPE, max_position_embeddings=CONTEXT, original_max_position_embeddings=CONTEXT
    ).save_pretrained(path)
    return path


@pytest.mark.parametrize("rope_type", ["linear", "yarn", "llama3"])
def test_phi3_gets_the_frequencies_of_transformers_own_scaling_as_longrope(phi3_model, rope_type):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ids = torch.randint(3, SHAPE["vocab_size"], (1, 3 * CONTEXT), generator=torch.Generator().manual_seed(1))
    scaled = AutoConfig.from_pretrained(phi3_model)
    # transformers' Phi-3 config accepts only longrope: the same frequencies are stored in that form
    assert apply_rope_scaling(scaled, rope_type, factor=FACTOR) == "longrope"
    ours = logits(phi3_model, scaled, ids)

    # Reference: the unscaled model with the inverse frequencies and attention factor of transformers' own
    # function for rope_type (its config validation refuses the type for Phi-3, so they are set after loading).
    reference = AutoModelForCausalLM.from_pretrained(phi3_model).eval()
    parameters, max_positions = REFERENCE[rope_type]
    probe = AutoConfig.from_pretrained(phi3_model)
    probe.rope_parameters = {"rope_theta": probe.rope_parameters["rope_theta"], **parameters}
    probe.max_position_embeddings = max_positions
    inv_freq, attention = ROPE_INIT_FUNCTIONS[rope_type](probe)
    rotary = reference.model.rotary_emb
    rotary.inv_freq.copy_(inv_freq)
    rotary.attention_scaling = attention
    with torch.no_grad():
        expected = reference(ids).logits
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0)
    plain = logits(phi3_model, AutoConfig.from_pretrained(phi3_model), ids)
    assert not torch.allclose(ours, plain, atol=1e-4)


def test_phi3_refuses_dynamic_scaling_which_has_no_longrope_form(phi3_model):
    config = AutoConfig.from_pretrained(phi3_model)
    before = config.to_dict()
    with pytest.raises(
        LmflowError, match="transformers does not support --rope-type dynamic for phi3 models"
    ):
        apply_rope_scaling(config, "dynamic", factor=2.0)
    assert config.to_dict() == before  # nothing half-applied


# --------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_llama(tmp_path_factory) -> Path:
    """A tiny Llama with the demo tokenizer and a pretrained context of 64 tokens."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("short-llama"), max_position_embeddings=CONTEXT)


LONG_TEXT = " ".join(
    f"Line {i} of the long story tells of the sea and the ship number {i}." for i in range(12)
)


@pytest.fixture
def long_texts(tmp_path) -> Path:
    return write_json(
        tmp_path / "long.json", {"type": "text_only", "instances": [{"text": LONG_TEXT} for _ in range(8)]}
    )


@pytest.mark.slow
def test_a_scaled_run_trains_long_blocks_and_the_saved_model_uses_them_with_no_flag(
    runner, short_llama, long_texts, tmp_path
):
    out = tmp_path / "out"
    result = invoke(
        runner,
        "run",
        "--model",
        short_llama,
        "--dataset",
        long_texts,
        "--output-dir",
        out,
        "--plugins",
        "rope_scaling",
        "--rope-type",
        "yarn",
        "--target-context",
        256,
        "--block-size",
        256,
        "--max-steps",
        2,
        "--batch-size",
        2,
        "--learning-rate",
        "1e-3",
    )
    assert result.exit_code == 0, result.output + result.stderr
    assert "note: RoPE scaling: yarn, factor 4: context 64 -> 256 tokens" in result.output
    record = json.loads((out / "lmflow_run.json").read_text())
    assert record["block_size"] == 256
    train = record["result"]["data"]["train"]
    # text_only data is grouped into blocks of 256 tokens: 4x the pretrained context
    assert train["block_size"] == 256 and train["examples"] == -(-train["tokens"] // 256) >= 8

    saved = AutoConfig.from_pretrained(out)
    assert saved.rope_parameters["rope_type"] == "yarn"
    assert saved.rope_parameters["factor"] == FACTOR
    assert saved.rope_parameters["original_max_position_embeddings"] == CONTEXT
    assert saved.max_position_embeddings == 256
    # The saved model computes what transformers' own yarn config computes with the trained weights.
    reference = AutoConfig.for_model(
        "llama",
        **{
            k: getattr(saved, k)
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
        },
        num_attention_heads=saved.num_attention_heads,
        num_key_value_heads=saved.num_key_value_heads,
        max_position_embeddings=256,
        rope_scaling=dict(REFERENCE["yarn"][0]),
    )
    ids = torch.randint(3, saved.vocab_size, (1, 200), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(out, None, ids), logits(out, reference, ids))

    # generate and evaluate read the scaling from the saved config: no flag, and a window beyond 64 tokens.
    prompt = LONG_TEXT[:600]
    generated = invoke(runner, "generate", out, "--prompt", prompt, "--max-new-tokens", 8, "--no-stream")
    assert generated.exit_code == 0, generated.output + generated.stderr
    assert generated.output.strip()
    evaluated = invoke(
        runner, "evaluate", out, "--dataset", long_texts, "--window", 200, "--output", tmp_path / "eval.json"
    )
    assert evaluated.exit_code == 0, evaluated.output + evaluated.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["metrics"]["eval_tokens"] > 8 * 100


def test_dynamic_scaling_lets_the_block_size_exceed_the_pretrained_context(short_llama, long_texts, tmp_path):
    lengths: set[int] = set()

    class Recorder:
        @hookimpl
        def prepare_dataset(self, dataset, split):
            lengths.update(len(ids) for ids in dataset["input_ids"])

    result = run(
        extra_plugins={"recorder": Recorder()},
        model=str(short_llama),
        dataset=str(long_texts),
        output_dir=str(tmp_path / "out"),
        plugins=["rope_scaling"],
        rope_scaling={"rope_type": "dynamic", "factor": 2},
        block_size=128,
        max_steps=1,
        batch_size=2,
    )
    assert max(lengths) == 128 and result.global_step == 1  # trained on blocks twice the pretrained context
    saved = AutoConfig.from_pretrained(tmp_path / "out")
    assert saved.rope_parameters["rope_type"] == "dynamic" and saved.max_position_embeddings == CONTEXT


@pytest.mark.parametrize(
    "model, extra, fragments",
    [
        ("short", ["--rope-factor", "0.5"], ["--rope-factor", "must be at least 1.0, got 0.5"]),
        (
            "short",
            ["--target-context", "32"],
            ["--target-context 32 is shorter than the model's context of 64"],
        ),
        ("short", [], ["needs --rope-factor F or --target-context N"]),
        ("short", ["--rope-factor", "2", "--target-context", "128"], ["pass only one of them"]),
        ("gpt2", ["--rope-factor", "2"], ["gpt2 models do not use rotary position embeddings (RoPE)"]),
        ("short", ["--rope-factor", "2", "--plugins", "rope_scaling,lora"], ["rope_scaling", "lora"]),
    ],
)
def test_user_errors_are_one_line_before_any_model_loads(
    runner, short_llama, tiny_gpt2, text_data, tmp_path, model_loads, model, extra, fragments
):
    path = short_llama if model == "short" else tiny_gpt2
    plugins = [] if "--plugins" in extra else ["--plugins", "rope_scaling"]
    args = [
        "run",
        "--model",
        path,
        "--dataset",
        text_data,
        "--output-dir",
        tmp_path / "out",
        *plugins,
        *extra,
    ]
    assert_one_line_error(invoke(runner, *args), *fragments)
    assert model_loads == []
    assert not (tmp_path / "out").exists()


def test_without_the_plugin_a_long_block_size_is_refused_naming_the_fix(
    runner, short_llama, text_data, tmp_path
):
    args = ["run", "--model", short_llama, "--dataset", text_data, "--output-dir", tmp_path / "out"]
    assert_one_line_error(
        invoke(runner, *args, "--block-size", 256),
        "--block-size 256 exceeds the model's context of 64 tokens",
        "--plugins rope_scaling --target-context 256",
    )
