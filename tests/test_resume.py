"""Checkpoints are atomic and a run killed with SIGKILL resumes to the same final weights."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file


def lmflow(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lmflow_core.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_llama, chat_data, tmp_path):
    common = [
        "run",
        "--model",
        tiny_llama,
        "--dataset",
        chat_data,
        "--template",
        "chatml",
        "--max-steps",
        "12",
        "--save-steps",
        "3",
        "--batch-size",
        "4",
        "--learning-rate",
        "3e-3",
        "--logging-steps",
        "1",
        "--save-total-limit",
        "10",
    ]
    straight = lmflow(*common, "--output-dir", tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    killed_dir = tmp_path / "killed"
    victim = lmflow(*common, "--output-dir", killed_dir)
    deadline = time.monotonic() + 300
    while not (killed_dir / "checkpoint-6").exists():
        assert victim.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed_dir / "model.safetensors").exists()
    # Every checkpoint directory that exists is complete; half-written ones only ever live in staging.
    for checkpoint in killed_dir.glob("checkpoint-*"):
        assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "optimizer.pt").is_file()

    again = lmflow(*common, "--output-dir", killed_dir)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 2 and "already holds an unfinished run" in output and "--resume" in output

    resumed = lmflow(*common, "--output-dir", killed_dir, "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resuming at step" in output
    assert not list(killed_dir.glob(".staging-*"))

    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(killed_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_half_written_checkpoint_is_ignored_on_resume(tiny_llama, chat_data, tmp_path):
    """A staging directory (what a kill during a save leaves) is removed; resume uses the last complete one."""
    from lmflow_core import run

    out = tmp_path / "out"
    run(
        model=str(tiny_llama),
        dataset=str(chat_data),
        template="chatml",
        output_dir=str(out),
        max_steps=2,
        save_steps=2,
        batch_size=4,
    )
    staging = out / ".staging-checkpoint-4" / "checkpoint-4"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"truncated")
    result = run(
        model=str(tiny_llama),
        dataset=str(chat_data),
        template="chatml",
        output_dir=str(out),
        max_steps=4,
        save_steps=2,
        batch_size=4,
        resume="latest",
    )
    assert result.global_step == 4
    assert not (out / ".staging-checkpoint-4").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_resume_from_an_explicit_checkpoint_path(tiny_llama, chat_data, tmp_path):
    from lmflow_core import run

    out = tmp_path / "out"
    run(
        model=str(tiny_llama),
        dataset=str(chat_data),
        template="chatml",
        output_dir=str(out),
        max_steps=4,
        save_steps=2,
        batch_size=4,
        logging_steps=1,
    )
    result = run(
        model=str(tiny_llama),
        dataset=str(chat_data),
        template="chatml",
        output_dir=str(tmp_path / "b"),
        max_steps=6,
        save_steps=2,
        batch_size=4,
        logging_steps=1,
        resume=str(out / "checkpoint-2"),
    )
    # Steps 1-2 come from the checkpoint's history; 3-6 were trained now.
    assert result.global_step == 6 and [step for step, _ in result.losses] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "b" / "checkpoint-6").is_dir() and not (tmp_path / "b" / "checkpoint-2").exists()
