"""The lisa plugin: layer sampling, optimizer state only for trainable layers, resume, and data parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import conversations, invoke, save_tiny_model, stopped_run, tiny_model, write_json
from lmflow_plugins.lisa import active_layers, find_layers, innermost_optimizer
from safetensors.torch import load_file

from lmflow_core import hookimpl
from lmflow_core.launch import free_port
from lmflow_core.train import run

LAYERS = 6


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory) -> Path:
    """A 6-layer Llama (untied embeddings) with the demo tokenizer."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("lisa-llama"), num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_json(
        tmp_path_factory.mktemp("lisa-data") / "chat.json",
        {"type": "conversation", "instances": conversations(48)},
    )


def lisa_run(model, data, out, extra=None, **settings):
    defaults = {
        "model": str(model),
        "dataset": str(data),
        "template": "chatml",
        "plugins": ["lisa"],
        "max_steps": 8,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_steps": 0,
        "output_dir": str(out),
    }
    return run(extra_plugins=extra or {}, **{**defaults, **settings})


# ---- finding the layers -------------------------------------------------------------------------------------

TINY = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}
ARCHITECTURES = {
    "llama": TINY,
    "mistral": TINY,
    "qwen2": TINY,
    "qwen3": {**TINY, "head_dim": 8},
    "phi3": {**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "gemma": {**TINY, "head_dim": 8},
    "gemma2": {**TINY, "head_dim": 8},
    "gemma3_text": {**TINY, "head_dim": 8},
    "granite": TINY,
    "gpt2": {"n_embd": 16, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0},
    "gpt_neox": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2},
    "opt": {"hidden_size": 16, "ffn_dim": 32, "num_attention_heads": 2, "word_embed_proj_dim": 16},
}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_finds_the_decoder_layers_of_common_architectures(model_type):
    layer_key = {"gpt2": "n_layer"}.get(model_type, "num_hidden_layers")
    model = tiny_model(model_type, vocab_size=64, **{layer_key: 3}, **ARCHITECTURES[model_type])
    path, layers = find_layers(model)
    assert len(layers) == 3
    assert type(layers[0]).__name__.endswith(("DecoderLayer", "Block", "Layer")), type(layers[0])
    # The list found is the stack of blocks the model runs: the largest list of modules it has.
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    assert max(lists, key=lambda m: sum(p.numel() for p in m.parameters())) is layers, path


def test_layers_attribute_names_the_list_and_a_wrong_one_is_a_clear_error(six_layers):
    from transformers import AutoModelForCausalLM

    from lmflow_core.errors import ConfigError

    model = AutoModelForCausalLM.from_pretrained(six_layers)
    path, layers = find_layers(model, "model.layers")
    assert path == "model.layers" and layers is model.model.layers
    with pytest.raises(ConfigError) as error:
        find_layers(model, "model.norm")
    assert "model.norm is not a list of layers" in error.value.message
    assert "model.layers" in error.value.hint


# ---- optimizer state ----------------------------------------------------------------------------------------


class OptimizerSpy:
    """After every step: which layers train, which parameters hold optimizer state and how much."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.initial: dict[str, torch.Tensor] = {}

    @hookimpl
    def prepare_model(self, config, model, tokenizer):
        self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @hookimpl
    def on_step(self, config, step):
        optimizer = innermost_optimizer(step.optimizer)
        layers = step.model.model.layers
        names = {id(p): n for n, p in step.model.named_parameters()}
        in_state = {names[id(p)] for p in optimizer.state}
        trainable = {n for n, p in step.model.named_parameters() if p.requires_grad}
        layer_trainable = sorted(
            i for i, layer in enumerate(layers) if all(p.requires_grad for p in layer.parameters())
        )
        state_numel = sum(
            t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()
        )
        layer_params = [{n for n, _ in layer.named_parameters()} for layer in layers]
        self.steps.append(
            {
                "step": step.global_step,
                "active": active_layers(config),
                "layer_trainable": layer_trainable,
                "in_state": in_state,
                "trainable": trainable,
                "state_numel": state_numel,
                "layers_in_state": sorted(
                    i
                    for i, params in enumerate(layer_params)
                    if any(f"model.layers.{i}.{n}" in in_state for n in params)
                ),
                "all_in_groups": sum(len(g["params"]) for g in optimizer.param_groups),
                "checkpointing": step.model.is_gradient_checkpointing,
            }
        )


def test_optimizer_state_exists_only_for_the_active_layers(six_layers, data, tmp_path):
    spy = OptimizerSpy()
    result = lisa_run(six_layers, data, tmp_path / "out", {"spy": spy}, lisa={"interval_steps": 2})
    assert result.global_step == 8
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(six_layers)
    layer_numel = sum(p.numel() for p in model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    outside_layers = total - LAYERS * layer_numel
    seen = set()
    for record in spy.steps:
        assert len(record["active"]) == 2
        assert record["layer_trainable"] == record["active"], record["step"]
        # Only trainable parameters hold state; no switched-off layer keeps any.
        assert record["in_state"] <= record["trainable"], record["step"]
        assert set(record["layers_in_state"]) <= set(record["active"]), record["step"]
        # AdamW keeps two moments per trained value: at most those of 2 layers and the non-layer weights.
        assert record["state_numel"] <= 2 * (2 * layer_numel + outside_layers), record["step"]
        # The optimizer's groups still list every parameter (one layout for checkpoints).
        assert record["all_in_groups"] == len(list(model.parameters()))
        seen.add(tuple(record["active"]))
    assert len(seen) >= 2, "the active layers never changed"
    # Right after a switch (steps 2, 4, 6) the newly active layers start with no state.
    switch = next(r for r in spy.steps if r["step"] == 2)
    assert switch["layers_in_state"] == [] and switch["state_numel"] == 2 * outside_layers
    # Before a switch the state covers exactly the active layers and the rest of the model.
    before = next(r for r in spy.steps if r["step"] == 1)
    assert before["state_numel"] == 2 * (2 * layer_numel + outside_layers)
    full_state = 2 * total
    assert before["state_numel"] / full_state < 0.75
    # Layers that were never active keep their initial weights exactly; active ones changed.
    final = load_file(str(tmp_path / "out" / "model.safetensors"))
    ever = {i for r in spy.steps for i in r["active"]}
    ever |= {i for i in range(LAYERS) if i in lisa_first_layers(spy)}
    for i in range(LAYERS):
        key = f"model.layers.{i}.mlp.down_proj.weight"
        unchanged = torch.equal(final[key], spy.initial[key])
        assert unchanged == (i not in ever), (i, ever)


def lisa_first_layers(spy: OptimizerSpy) -> list[int]:
    """The layers of the first period (steps before the first switch)."""
    return spy.steps[0]["active"]


def test_frozen_embeddings_and_head_stay_frozen(six_layers, data, tmp_path):
    spy = OptimizerSpy()
    lisa_run(
        six_layers,
        data,
        tmp_path / "out",
        {"spy": spy},
        max_steps=3,
        lisa={"freeze_embeddings": True, "freeze_lm_head": True},
    )
    final = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(final[key], spy.initial[key]), key
    assert all("embed_tokens" not in n and "lm_head" not in n for r in spy.steps for n in r["in_state"])
    assert not torch.equal(final["model.norm.weight"], spy.initial["model.norm.weight"])


# ---- resume, gradient checkpointing, bf16 -------------------------------------------------------------------


def test_resume_restores_the_active_layers_and_ends_bit_identical(six_layers, data, tmp_path):
    settings = {"lisa": {"interval_steps": 3}, "save_steps": 4, "save_total_limit": 5}
    lisa_run(six_layers, data, tmp_path / "straight", **settings)
    checkpoint = tmp_path / "straight" / "checkpoint-4"
    saved = json.loads((checkpoint / "lisa_state.json").read_text())
    assert saved["layers_path"] == "model.layers" and len(saved["active_layers"]) == 2

    resumed_dir = tmp_path / "resumed"
    stopped_run(tmp_path / "straight", "checkpoint-4", resumed_dir)
    spy = OptimizerSpy()
    lisa_run(six_layers, data, resumed_dir, {"spy": spy}, resume="latest", **settings)
    # Step 5 is in the same period as the checkpoint (steps 3-5): the checkpoint's layers are active again.
    assert spy.steps[0]["step"] == 5 and spy.steps[0]["active"] == saved["active_layers"]
    expected = load_file(str(tmp_path / "straight" / "model.safetensors"))
    actual = load_file(str(resumed_dir / "model.safetensors"))
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def draw(step: int, interval: int = 2, seed: int = 42) -> list[int]:
    """The layers LISA activates for the period of ``step`` (2 of 6)."""
    from lmflow_plugins.lisa import LisaState

    return LisaState("model.layers", [None] * LAYERS, interval, 2, seed).draw(step)


def test_lisa_with_gradient_checkpointing_and_bf16(six_layers, data, tmp_path):
    spy = OptimizerSpy()
    result = lisa_run(
        six_layers,
        data,
        tmp_path / "out",
        {"spy": spy},
        max_steps=4,
        gradient_checkpointing=True,
        bf16=True,
        lisa={"interval_steps": 2},
    )
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert all(r["checkpointing"] for r in spy.steps)
    # Switched after step 2; not after the last step (no step left to train the new layers).
    assert [r["active"] for r in spy.steps] == [draw(0), draw(2), draw(2), draw(2)]
    assert all(r["in_state"] <= r["trainable"] for r in spy.steps)


# ---- errors -------------------------------------------------------------------------------------------------


def test_lisa_and_lora_cannot_be_combined(runner, six_layers, data, tmp_path):
    result = invoke(runner, "run", "--model", six_layers, "--dataset", data, "--plugins", "lisa,lora")
    assert result.exit_code == 2
    assert "plugins 'lisa' and 'lora' cannot be combined" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_more_active_layers_than_the_model_has_fails_before_loading(
    runner, six_layers, data, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    loads = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a))
    result = invoke(
        runner, "run", "--model", six_layers, "--dataset", data, "--template", "chatml",
        "--plugins", "lisa", "--lisa-activated-layers", "7", "--output-dir", tmp_path / "o",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--lisa-activated-layers 7 exceeds the model's 6 decoder layers" in result.stderr
    assert loads == [] and not (tmp_path / "o").exists()


def test_freezing_only_one_of_tied_embeddings_and_head_is_refused(runner, tiny_gpt2, data, tmp_path):
    result = invoke(
        runner, "run", "--model", tiny_gpt2, "--dataset", data, "--template", "chatml",
        "--plugins", "lisa", "--lisa-activated-layers", "1", "--lisa-freeze-embeddings",
        "--output-dir", tmp_path / "o",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "shares its weights with the input embeddings" in result.stderr


# ---- data parallelism ---------------------------------------------------------------------------------------

DDP_SCRIPT = """
import hashlib, json, os, sys
import torch
from lmflow_core import hookimpl
from lmflow_core.train import run
from lmflow_plugins.lisa import active_layers

model, data, out = sys.argv[1:4]
rank = int(os.environ["RANK"])
record = {"losses": [], "active": []}

class Spy:
    @hookimpl
    def on_step(config, step):
        record["losses"].append(step.loss)
        record["active"].append(active_layers(config))
        record["world"] = torch.distributed.get_world_size()
        if step.global_step == step.max_steps:
            digest = hashlib.sha256()
            for name, tensor in sorted(step.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().numpy().tobytes())
            record["weights"] = digest.hexdigest()
            with open(os.path.join(os.path.dirname(out), f"rank{rank}.json"), "w") as handle:
                json.dump(record, handle)

run(model=model, dataset=data, template="chatml", plugins=["lisa"], lisa={"interval_steps": 2},
    max_steps=5, batch_size=2, learning_rate=1e-2, logging_steps=1, save_steps=0, output_dir=out,
    gradient_checkpointing=True, extra_plugins={"spy": Spy})
"""


@pytest.mark.slow
def test_two_processes_keep_identical_weights_across_layer_switches(six_layers, data, tmp_path):
    script = tmp_path / "ddp_lisa.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(script), str(six_layers), str(data), str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    # Each process trained on its own share of the data (different losses)...
    assert ranks[0]["losses"][0] != ranks[1]["losses"][0]
    # ...with the same layers active at every step, switched at least once...
    assert ranks[0]["active"] == ranks[1]["active"]
    assert len({tuple(a) for a in ranks[0]["active"]}) >= 2
    # ...and ends with the same weights on both.
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert (tmp_path / "out" / "model.safetensors").is_file()
