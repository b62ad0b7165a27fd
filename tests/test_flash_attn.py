"""The flash_attn plugin: FlashAttention-2 exactly when package, GPU and precision allow it; otherwise one line
saying why, and PyTorch SDPA. It composes with --packing and --gradient-checkpointing."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from helpers import write_json
from lmflow_plugins import flash_attn
from lmflow_plugins.flash_attn import Machine, choose_attention

from lmflow_core import run
from lmflow_core.report import Reporter

AMPERE = Machine("2.7.4", (8, 0))


def settings(bf16: bool = False, fp16: bool = False, model_dtype: str = "float32") -> SimpleNamespace:
    return SimpleNamespace(bf16=bf16, fp16=fp16, model_dtype=model_dtype)


@pytest.mark.parametrize(
    "run_settings", [settings(bf16=True), settings(fp16=True), settings(model_dtype="bfloat16")]
)
def test_flash_attention_is_chosen_when_package_gpu_and_precision_allow(run_settings):
    assert choose_attention(run_settings, AMPERE) == (
        "flash_attention_2",
        "flash_attn: using FlashAttention-2 (flash-attn 2.7.4)",
    )
    assert choose_attention(run_settings, Machine("2.8.0", (9, 0)))[0] == "flash_attention_2"


@pytest.mark.parametrize(
    ("machine", "run_settings", "reason"),
    [
        (Machine(None, (8, 0)), settings(bf16=True), "the flash-attn package is not installed"),
        (Machine("2.1.0", (8, 0)), settings(bf16=True), "flash-attn 2.1.0 is older than 2.3.3"),
        (Machine("2.7.4", None), settings(bf16=True), "no CUDA GPU"),
        (
            Machine("2.7.4", (7, 5)),
            settings(fp16=True),
            "the GPU has compute capability 7.5; FlashAttention-2 needs 8.0",
        ),
        (AMPERE, settings(), "the run computes in float32; FlashAttention-2 needs --bf16, --fp16"),
    ],
)
def test_otherwise_sdpa_with_one_line_naming_the_reason(machine, run_settings, reason):
    implementation, message = choose_attention(run_settings, machine)
    assert implementation == "sdpa"
    assert message.startswith(f"flash_attn: {reason}") and message.endswith("; using PyTorch SDPA")
    assert "\n" not in message


def test_the_hook_reads_the_machine(monkeypatch):
    """The facts come from the installed package and the CUDA device (both faked here)."""
    from importlib import metadata

    real_version = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "2.7.4" if name == "flash-attn" else real_version(name)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert flash_attn.detect_machine() == AMPERE
    notes = []
    monkeypatch.setattr(flash_attn, "note", notes.append)
    assert flash_attn.model_init_kwargs(settings(bf16=True)) == {"attn_implementation": "flash_attention_2"}
    assert notes == ["flash_attn: using FlashAttention-2 (flash-attn 2.7.4)"]


def conversations() -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Count to {i + 1}."},
                {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 2)) + "."},
            ]
        }
        for i in range(8)
    ]


class ModelSpy:
    """A plugin object that keeps the trained model."""

    model = None

    @staticmethod
    def on_train_end(model):
        ModelSpy.model = model


@pytest.mark.skipif(flash_attn.detect_machine().cuda_capability is not None, reason="checks the CPU fallback")
def test_without_a_gpu_the_run_says_why_and_trains_with_sdpa(tiny_llama, tmp_path):
    from lmflow_core import hookimpl

    spy = SimpleNamespace(on_train_end=hookimpl(ModelSpy.on_train_end))
    data = write_json(tmp_path / "chat.json", {"type": "conversation", "instances": conversations()})
    out = io.StringIO()
    result = run(
        model=str(tiny_llama),
        dataset=str(data),
        template="chatml",
        output_dir=str(tmp_path / "out"),
        plugins=["flash_attn"],
        extra_plugins={"spy": spy},
        packing=True,
        gradient_checkpointing=True,
        block_size=96,
        max_steps=3,
        batch_size=2,
        save_steps=0,
        reporter=Reporter(stream=out),
    )
    expected = (
        "note: flash_attn: the flash-attn package is not installed; using PyTorch SDPA"
        if flash_attn.detect_machine().flash_attn_version is None
        else "note: flash_attn: no CUDA GPU; using PyTorch SDPA"
    )
    lines = out.getvalue().splitlines()
    assert [line for line in lines if "flash_attn:" in line] == [expected]
    assert ModelSpy.model.config._attn_implementation == "sdpa"
    assert result.global_step == 3 and result.data["train"]["packing"]["rows"] < 8


@pytest.mark.gpu
@pytest.mark.skipif(
    flash_attn.detect_machine().cuda_capability is None
    or flash_attn.detect_machine().flash_attn_version is None,
    reason="needs a CUDA GPU and the flash-attn package",
)
def test_flash_attention_keeps_packed_examples_apart_on_a_gpu(tiny_llama):
    """Packed rows under FlashAttention-2 give each example the logits it has alone under SDPA."""
    import datasets
    from transformers import AutoModelForCausalLM

    from lmflow_core.data.packing import PackedCollator, pack_dataset

    sequences = [list(range(3 + n, 3 + 2 * n)) for n in (11, 5, 8, 3, 14)]
    data = datasets.Dataset.from_dict({"input_ids": sequences, "labels": sequences})
    rows, _ = pack_dataset(data, 24)
    batch = PackedCollator(SimpleNamespace(pad_token_id=0))(list(rows))
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    models = {
        implementation: AutoModelForCausalLM.from_pretrained(
            tiny_llama, attn_implementation=implementation, dtype=torch.bfloat16
        )
        .cuda()
        .eval()
        for implementation in ("flash_attention_2", "sdpa")
    }
    compared = 0
    with torch.no_grad():
        packed = models["flash_attention_2"](**batch).logits.float()
        for row, positions, logits in zip(batch["input_ids"], batch["position_ids"], packed):
            starts = [*(positions == 0).nonzero().flatten().tolist(), len(positions)]
            for begin, end in zip(starts, starts[1:]):
                if row[begin:end].tolist() in sequences:
                    alone = models["sdpa"](input_ids=row[None, begin:end]).logits[0].float()
                    assert (logits[begin:end] - alone).abs().max().item() < 2e-2
                    compared += 1
    assert compared == len(sequences)  # every example was found whole in the packed rows
