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
        # A constant learning rate: a step too many changes the weights (a decayed one would be ~0 at the end).
        "--lr-scheduler",
        "constant",
    ]


@pytest.fixture(scope="module")
def straight_run(tiny_llama, tmp_path_factory):
    """The weights of an uninterrupted 12-step run."""
    from helpers import conversations, write_json

    tmp = tmp_path_factory.mktemp("straight")
    # 28 records at batch 4: 7 steps an epoch, so step 12 is mid-epoch (where an extra step used to slip in).
    data = write_json(tmp / "chat.json", {"type": "conversation", "instances": conversations(28)})
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
    # Killed half-way through writing checkpoint-6.
    victim = killed_run(tiny_llama, data, out, checkpoint_killer("checkpoint-6"))
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


def checkpoint_killer(name: str) -> str:
    """Code for a plugin that kills the run while it writes checkpoint ``name``."""
    return (
        "class Killer:\n"
        "    @hookimpl\n"
        "    def on_checkpoint_save(self, checkpoint_dir):\n"
        f"        if checkpoint_dir.endswith('{name}'):\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "extra['killer'] = Killer()\n"
    )


def killed_run(tiny_llama, data, out, killer: str) -> subprocess.CompletedProcess:
    """The run of ``common_args`` from Python in a child process, with ``killer`` code set up first."""
    settings = {
        "model": str(tiny_llama),
        "dataset": str(data),
        "template": "chatml",
        "max_steps": 12,
        "save_steps": 3,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "save_total_limit": 10,
        "output_dir": str(out),
    }
    script = out.parent / "killer.py"
    script.write_text(
        "import json, os, signal, sys\n"
        "from lmflow_core import hookimpl, run\n"
        "extra = {}\n" + killer + "run(**json.loads(sys.argv[1]), extra_plugins=extra)\n"
    )
    return subprocess.run([sys.executable, str(script), json.dumps(settings)], capture_output=True, text=True)


KILLERS = {
    # Killed with the final model complete in .staging-final, before any file is moved into place.
    "final-staged": (
        "import lmflow_core.trainer as trainer\n"
        "real = trainer.fsync_tree\n"
        "def fsync_tree(path):\n"
        "    real(path)\n"
        "    if str(path).endswith('.staging-final'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "trainer.fsync_tree = fsync_tree\n"
    ),
    # Killed after the first file of the final save was moved into place (the rest still staged).
    "final-half-moved": (
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    real(src, dst)\n"
        "    if os.path.basename(os.path.dirname(str(src))) == '.staging-final':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\n"
    ),
    # Killed while writing the last checkpoint (checkpoint-12 never becomes a checkpoint).
    "last-checkpoint": checkpoint_killer("checkpoint-12"),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(KILLERS))
def test_a_run_killed_at_its_end_resumes_to_exactly_the_uninterrupted_run(
    tiny_llama, straight_run, tmp_path, moment
):
    """No step beyond --max-steps, no checkpoint-13, the same final weights (constant learning rate)."""
    data, expected = straight_run
    common = common_args(tiny_llama, data)
    out = tmp_path / "out"
    victim = killed_run(tiny_llama, data, out, KILLERS[moment])
    assert victim.returncode == -signal.SIGKILL, victim.stderr
    record = json.loads((out / "lmflow_run.json").read_text())
    assert record["status"] == "running"
    if moment == "last-checkpoint":
        assert (out / "checkpoint-9").is_dir() and not (out / "checkpoint-12").exists()
    else:
        assert (out / "checkpoint-12").is_dir() and (out / ".staging-final").is_dir()
    if moment == "final-half-moved":
        # The files of the final save are the run's before they are moved: --overwrite may replace them.
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(record["outputs"])
    assert not (out / "model.safetensors").exists() or moment == "final-half-moved"
    if moment == "final-half-moved":
        staged = {p.name for p in (out / ".staging-final").iterdir()}
        in_place = {name for name in record["outputs"] if (out / name).exists()} - {"lmflow_run.json"}
        assert len(in_place - {"run_config.yaml"}) == 1 and staged and not staged & in_place

    resumed = lmflow(*common, "--output-dir", out, "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "step 13" not in output and "done: 12 steps" in output, output
    assert not (out / "checkpoint-13").exists() and not (out / ".staging-final").exists()
    record = json.loads((out / "lmflow_run.json").read_text())
    assert record["status"] == "completed" and record["result"]["global_step"] == 12
    assert_same_weights(expected, out / "model.safetensors")


def varied_conversations(n: int) -> list[dict]:
    """Conversations of very different lengths, so that grouping them by length changes the padding."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"Count to {i % 9 + 1}."},
                {"role": "assistant", "content": " ".join(str(k) for k in range((i * 7) % 23 + 1))},
            ]
        }
        for i in range(n)
    ]


class PaddingMeter:
    """A plugin that counts the padded and the real tokens of every training batch (core collator inside)."""

    def __init__(self):
        self.padded = self.real = 0

    @staticmethod
    def _inner(config, tokenizer):
        from lmflow_core.data.collate import PaddingCollator

        return PaddingCollator(tokenizer)

    def data_collator(self, config, tokenizer):
        inner = self._inner(config, tokenizer)

        def collate(features):
            batch = inner(features)
            self.padded += batch["input_ids"].numel()
            self.real += int(batch["attention_mask"].sum())
            return batch

        return collate


def test_group_by_length_pads_less_and_resumes_to_the_same_weights(tiny_llama, tmp_path):
    from helpers import write_json

    from lmflow_core import hookimpl, run

    PaddingMeter.data_collator = hookimpl(PaddingMeter.data_collator)
    data = write_json(tmp_path / "chat.json", {"type": "conversation", "instances": varied_conversations(64)})
    settings = dict(
        model=str(tiny_llama),
        dataset=str(data),
        template="chatml",
        batch_size=4,
        learning_rate=3e-3,
        lr_scheduler="constant",
        logging_steps=1,
        save_steps=5,
    )
    plain, grouped = PaddingMeter(), PaddingMeter()
    run(**settings, output_dir=str(tmp_path / "plain"), max_steps=16, extra_plugins={"meter": plain})
    run(
        **settings,
        output_dir=str(tmp_path / "grouped"),
        max_steps=16,
        group_by_length=True,
        extra_plugins={"meter": grouped},
    )
    assert plain.real == grouped.real  # the same examples, one epoch each...
    assert grouped.padded < 0.85 * plain.padded, (grouped.padded, plain.padded)  # ...with less padding

    # Stopped after step 5 and resumed: the same weights as the run that went straight to step 16.
    run(**settings, output_dir=str(tmp_path / "halves"), max_steps=5, group_by_length=True)
    run(
        **settings,
        output_dir=str(tmp_path / "resumed"),
        max_steps=16,
        group_by_length=True,
        resume=str(tmp_path / "halves" / "checkpoint-5"),
    )
    expected = load_file(str(tmp_path / "grouped" / "model.safetensors"))
    assert_same_weights(expected, tmp_path / "resumed" / "model.safetensors")
