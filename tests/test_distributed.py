"""Several processes: `lmflow run --nproc N` (DDP), the zero3/zero2 (DeepSpeed) and fsdp plugins, on CPU over gloo.

Each engine's 2-process run (batch 4 per process) is compared with a 1-process run of the same global batch
(batch 8): per-step losses, and the saved model's weights and logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import conversations, invoke, save_tiny_model, stopped_run, write_json
from safetensors.torch import load_file

from lmflow_core.launch import Launch, strip_launch_args, torchrun_command

STEPS = 6
LOSS_TOLERANCE = 1e-4  # absolute, per step (fp32; the sums of two half batches in another order)
WEIGHT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_model("llama", root / "model", num_hidden_layers=4)
    data = write_json(root / "chat.json", {"type": "conversation", "instances": conversations(40)})
    return root, model, data


def lmflow(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "lmflow-torch-extensions")
        ),
    }
    env.pop("LOCAL_RANK", None)
    return subprocess.run(
        [sys.executable, "-m", "lmflow_core.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=cwd,
    )


def run_args(model, data, out, batch_size: int, *extra) -> list:
    return [
        "run", "--model", model, "--dataset", data, "--template", "chatml", "--max-steps", STEPS,
        "--batch-size", batch_size, "--learning-rate", "1e-3", "--logging-steps", 1, "--save-steps", 0,
        "--output-dir", out, *extra,
    ]  # fmt: skip


def losses(out: Path) -> list[float]:
    record = json.loads((out / "lmflow_run.json").read_text())
    assert record["status"] == "completed"
    return [loss for _, loss in record["result"]["losses"]]


@pytest.fixture(scope="module")
def single(setup):
    """The reference: one process, batch 8."""
    root, model, data = setup
    out = root / "single"
    done = lmflow(*run_args(model, data, out, 8))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def assert_matches_single(single: Path, out: Path, done: subprocess.CompletedProcess) -> dict:
    """Same losses per step, same weights and logits; printed once; written once."""
    expected, actual = losses(single), losses(out)
    assert len(actual) == STEPS
    differences = [abs(a - b) for a, b in zip(expected, actual)]
    assert max(differences) < LOSS_TOLERANCE, (expected, actual)
    reference = load_file(str(single / "model.safetensors"))
    weights = load_file(str(out / "model.safetensors"))
    assert reference.keys() == weights.keys()
    weight_difference = max((reference[k] - weights[k]).abs().max().item() for k in reference)
    assert weight_difference < WEIGHT_TOLERANCE
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[3, 17, 42, 99, 7, 250]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(single)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert (a - b).abs().max().item() < 1e-4
    # Only the first process prints, and the output directory holds one run.
    assert done.stdout.count("step 1/6 |") == 1, done.stdout
    assert done.stdout.count("saved: ") == 1
    assert not list(out.glob(".staging-*"))
    return {"max_loss_difference": max(differences), "max_weight_difference": weight_difference}


# ---- the launcher ---------------------------------------------------------------------------------------------


def test_launch_arguments_are_passed_on_without_the_launch_flags():
    args = ["--model", "m", "--nproc", "2", "--nnodes=1", "--plugins", "zero3", "--master-port", "1234"]
    assert strip_launch_args(args) == ["--model", "m", "--plugins", "zero3"]
    single_node = torchrun_command(Launch(nproc=2), ["--model", "m"])
    assert single_node[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]
    assert single_node[-5:] == ["-m", "lmflow_core.cli", "run", "--model", "m"]
    nodes = torchrun_command(
        Launch(nproc=4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=7000), []
    )
    assert "--nnodes=2" in nodes and "--node-rank=1" in nodes and "--master-addr=10.0.0.1" in nodes
    assert "--master-port=7000" in nodes and "--standalone" not in nodes


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nnodes", "2"], "--nnodes 2 needs --master-addr"),
        (
            ["--nnodes", "2", "--master-addr", "h", "--node-rank", "2"],
            "--node-rank 2 is not below --nnodes 2",
        ),
        (["--nproc", "0"], "Invalid value for '--nproc'"),
    ],
)
def test_bad_launch_settings_are_refused_before_anything_starts(
    runner, tiny_llama, chat_data, flags, message
):
    result = invoke(
        runner, "run", "--model", tiny_llama, "--dataset", chat_data, "--template", "chatml", *flags
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "starting" not in result.stderr


def test_nproc_inside_a_launched_process_is_refused(runner, tiny_llama, chat_data, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    result = invoke(runner, "run", "--model", tiny_llama, "--dataset", chat_data, "--nproc", "2")
    assert result.exit_code == 2
    assert "already started" in result.stderr and "Drop --nproc" in result.stderr


def test_a_mistake_is_reported_once_before_processes_start(setup, tmp_path):
    root, model, data = setup
    done = lmflow("run", "--model", model, "--dataset", data, "--nproc", "2", "--output-dir", tmp_path / "o")
    assert done.returncode == 2
    assert done.stderr.count("holds conversations, which need a template") == 1
    assert "starting" not in done.stderr and not (tmp_path / "o").exists()


# ---- engines ----------------------------------------------------------------------------------------------------


ENGINES = {
    "ddp": [],
    "zero2": ["--plugins", "zero2"],
    "fsdp": ["--plugins", "fsdp", "--gradient-checkpointing"],
}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_two_processes_match_one_process(setup, single, engine):
    if engine == "zero2":
        pytest.importorskip("deepspeed")
    root, model, data = setup
    out = root / engine
    done = lmflow(*run_args(model, data, out, 4, "--nproc", 2, *ENGINES[engine]))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "batch 4 x 1 accumulation x 2 processes" in done.stdout
    print(engine, assert_matches_single(single, out, done))  # shown with pytest -s


@pytest.mark.slow
def test_zero3_with_offload_matches_one_process_and_resumes(setup, single, tmp_path):
    pytest.importorskip("deepspeed")
    root, model, data = setup
    out = root / "zero3"
    flags = ["--nproc", 2, "--plugins", "zero3", "--zero3-offload-optimizer", "--zero3-offload-params"]
    done = lmflow(*run_args(model, data, out, 4, *flags, "--save-steps", 3))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print("zero3", assert_matches_single(single, out, done))  # shown with pytest -s
    record = json.loads((out / "lmflow_run.json").read_text())
    assert record["config"]["zero3"] == {"offload_optimizer": True, "offload_params": True, "config": None}

    # Resume from the step-3 checkpoint in a fresh directory: the same final weights.
    resumed = tmp_path / "resumed"
    stopped_run(out, "checkpoint-3", resumed)
    done = lmflow(*run_args(model, data, resumed, 4, *flags, "--save-steps", 3, "--resume"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "step 4/6 |" in done.stdout and "step 3/6 |" not in done.stdout
    expected = load_file(str(out / "model.safetensors"))
    actual = load_file(str(resumed / "model.safetensors"))
    assert max((expected[k] - actual[k]).abs().max().item() for k in expected) < WEIGHT_TOLERANCE


@pytest.mark.slow
def test_zero3_with_lora_saves_an_adapter(setup, tmp_path):
    pytest.importorskip("deepspeed")
    root, model, data = setup
    out = tmp_path / "zero3-lora"
    done = lmflow(*run_args(model, data, out, 4, "--nproc", 2, "--plugins", "zero3,lora"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # gathered, not empty partitions
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), out)
    base = AutoModelForCausalLM.from_pretrained(model)
    ids = torch.tensor([[3, 17, 42, 99]])
    with torch.no_grad():
        assert not torch.allclose(loaded(ids).logits, base(ids).logits)


# ---- DeepSpeed configuration ------------------------------------------------------------------------------------


def test_zero3_config_is_built_from_the_run_options(tmp_path):
    from lmflow_plugins import deepspeed_config

    from lmflow_core.train import configure

    config, _ = configure(
        model="m", dataset="d", plugins=["zero3"], batch_size=3, grad_accum=2, max_grad_norm=0.5, bf16=True,
        zero3={"offload_optimizer": True},
    )  # fmt: skip
    built = deepspeed_config.build(config, "zero3", 3)
    assert built["train_micro_batch_size_per_gpu"] == 3 and built["gradient_accumulation_steps"] == 2
    assert built["gradient_clipping"] == 0.5 and built["bf16"] == {"enabled": True}
    assert built["zero_optimization"]["stage"] == 3
    assert built["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in built["zero_optimization"]
    assert built["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True

    user = write_json(tmp_path / "ds.json", {"zero_optimization": {"reduce_bucket_size": 1000}, "x": 1})
    config, _ = configure(model="m", dataset="d", plugins=["zero3"], zero3={"config": str(user)})
    merged = deepspeed_config.build(config, "zero3", 3)
    assert merged["zero_optimization"]["reduce_bucket_size"] == 1000 and merged["x"] == 1
    assert merged["zero_optimization"]["stage"] == 3
    assert deepspeed_config.optimizer_arguments(
        {"optimizer": {"params": {"betas": [0.8, 0.95], "eps": 1e-6}}}
    ) == {
        "adam_beta1": 0.8,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-6,
    }
    assert deepspeed_config.optimizer_arguments(built) == {}  # "auto" leaves the Trainer's own


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"train_micro_batch_size_per_gpu": 16}, "sets train_micro_batch_size_per_gpu to 16 but the run's --batch-size gives 8"),
        ({"bf16": {"enabled": True}}, "sets bf16.enabled to True but the run's --bf16 gives False"),
        ({"zero_optimization": {"stage": 2}}, "sets zero_optimization.stage to 2, but the zero3 plugin runs stage 3"),
        ({"optimizer": {"params": {"lr": 3e-5}}}, "sets optimizer.params.lr to 3e-05 but the run's --learning-rate gives 2e-05"),
        ({"train_batch_size": 64}, "sets train_batch_size, which lmflow derives from --batch-size"),
        ("not json", "is not valid JSON"),
    ],
)  # fmt: skip
def test_a_deepspeed_json_that_contradicts_the_run_is_refused(
    runner, tiny_llama, chat_data, tmp_path, content, message
):
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    result = invoke(
        runner, "run", "--model", tiny_llama, "--dataset", chat_data, "--template", "chatml",
        "--plugins", "zero3", "--zero3-config", path, "--output-dir", tmp_path / "o",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "o").exists()


def test_zero3_without_deepspeed_says_how_to_install_it(runner, tiny_llama, chat_data, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    result = invoke(runner, "run", "--model", tiny_llama, "--dataset", chat_data, "--plugins", "zero3")
    assert result.exit_code == 2
    assert "needs DeepSpeed, which is not installed" in result.stderr
    assert "pip install 'lmflow[deepspeed]'" in result.stderr


@pytest.mark.parametrize("engine", ["zero3", "zero2", "fsdp"])
def test_lisa_with_a_sharding_engine_is_refused_with_the_reason(runner, tiny_llama, chat_data, engine):
    result = invoke(
        runner, "run", "--model", tiny_llama, "--dataset", chat_data, "--plugins", f"lisa,{engine}"
    )
    assert result.exit_code == 2
    assert f"plugins '{engine}' and 'lisa' cannot be combined" in result.stderr
    assert "--nproc" in result.stderr
