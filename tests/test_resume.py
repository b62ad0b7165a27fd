"""Checkpoints are atomic and a run killed with SIGKILL resumes to the same final weights."""

from __future__ import annotations

import json
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


def common_args(tiny_llama, chat_data) -> list:
    return [
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


@pytest.fixture(scope="module")
def straight_run(tiny_llama, tmp_path_factory):
    """The weights of an uninterrupted 12-step run."""
    from conftest import conversations, write_json

    tmp = tmp_path_factory.mktemp("straight")
    data = write_json(tmp / "chat.json", {"type": "conversation", "instances": conversations()})
    straight = lmflow(*common_args(tiny_llama, data), "--output-dir", tmp / "out")
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    return data, load_file(str(tmp / "out" / "model.safetensors"))


def assert_same_weights(expected: dict, path) -> None:
    actual = load_file(str(path))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_llama, straight_run, tmp_path):
    data, expected = straight_run
    common = common_args(tiny_llama, data)

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

    assert_same_weights(expected, killed_dir / "model.safetensors")


@pytest.mark.slow
def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(
    tiny_llama, straight_run, tmp_path
):
    data, expected = straight_run
    common = common_args(tiny_llama, data)
    out = tmp_path / "out"
    settings = {
        "model": str(tiny_llama),
        "dataset": str(data),
        "template": "chatml",
        "max_steps": 12,
        "save_steps": 3,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "save_total_limit": 10,
        "output_dir": str(out),
    }
    script = tmp_path / "killer.py"
    script.write_text(
        "import json, os, signal, sys\n"
        "from lmflow_core import hookimpl, run\n"
        "class Killer:\n"
        "    @hookimpl\n"
        "    def on_checkpoint_save(self, checkpoint_dir):\n"
        "        if checkpoint_dir.endswith('checkpoint-6'):\n"
        "            os.kill(os.getpid(), signal.SIGKILL)  # dies half-way through writing checkpoint-6\n"
        "run(**json.loads(sys.argv[1]), extra_plugins={'killer': Killer()})\n"
    )
    victim = subprocess.run(
        [sys.executable, str(script), json.dumps(settings)], capture_output=True, text=True
    )
    assert victim.returncode == -signal.SIGKILL, victim.stderr
    assert (out / "checkpoint-3").is_dir() and not (out / "checkpoint-6").exists()
    staged = out / ".staging-checkpoint-6" / "checkpoint-6"
    assert (staged / "optimizer.pt").is_file()  # the trainer had written it; it never became a checkpoint

    resumed = lmflow(*common, "--output-dir", out, "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resuming at step 3" in output
    assert not (out / ".staging-checkpoint-6").exists()
    assert_same_weights(expected, out / "model.safetensors")


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
