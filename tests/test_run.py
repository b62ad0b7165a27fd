"""`lmflow run` from the command line and from Python: outputs, config precedence, plugin flags, and every
error a user can cause (one line, non-zero exit, nothing loaded or written)."""

from __future__ import annotations

import json
import time

import pytest
import sample_plugin
import torch
import yaml
from helpers import conversations, invoke, write_json
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmflow_core import plugins as plugins_module
from lmflow_core import run
from lmflow_core.errors import DataError


@pytest.fixture
def with_sample_plugin(monkeypatch):
    """Make tests/sample_plugin.py an installed plugin named 'sample'."""
    real = plugins_module.discover_plugins

    def discover():
        found = real()
        found["sample"] = plugins_module.PluginInfo("sample", "sample_plugin", "lmflow-sample-tests", "9.9")
        return found

    monkeypatch.setattr(plugins_module, "discover_plugins", discover)


def test_run_writes_a_model_directory_that_transformers_loads(runner, fast_run_args, tmp_path):
    result = invoke(runner, *fast_run_args)
    assert result.exit_code == 0, result.output + result.stderr
    out = tmp_path / "out"
    assert "step 1/4 | loss" in result.output and "step 4/4 | loss" in result.output
    assert "done: 4 steps" in result.output
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "lmflow_run.json",
        "run_config.yaml",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(out.glob(".staging-*"))

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("<|im_start|>user\nWhat is 1 plus 1?<|im_end|>\n", return_tensors="pt")["input_ids"]
    checkpoint = AutoModelForCausalLM.from_pretrained(out / "checkpoint-4")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, checkpoint(ids).logits)

    record = json.loads((out / "lmflow_run.json").read_text())
    assert record["status"] == "completed" and record["template"] == "chatml"
    assert record["config"]["max_steps"] == 4 and record["plugins"] == []
    assert record["result"]["global_step"] == 4 and len(record["result"]["losses"]) == 4
    assert yaml.safe_load((out / "run_config.yaml").read_text())["template"] == "chatml"


def test_loss_falls_on_learnable_data(tiny_llama, tmp_path):
    data = write_json(tmp_path / "c.json", {"type": "conversation", "instances": conversations(8) * 4})
    result = run(
        model=str(tiny_llama),
        dataset=str(data),
        template="chatml",
        output_dir=str(tmp_path / "o"),
        max_steps=30,
        batch_size=8,
        learning_rate=1e-2,
        logging_steps=5,
        save_steps=None,
    )
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.tokens_seen > 0 and result.tokens_per_second > 0


def test_a_trained_model_keeps_its_template_for_the_next_run(runner, fast_run_args, tmp_path, chat_data):
    assert invoke(runner, *fast_run_args).exit_code == 0
    result = invoke(
        runner,
        "run",
        "--model",
        tmp_path / "out",
        "--dataset",
        chat_data,
        "--output-dir",
        tmp_path / "again",
        "--max-steps",
        "1",
        "--save-steps",
        "1",
    )
    assert result.exit_code == 0, result.stderr
    assert "template: chatml" in result.output


def test_config_file_is_read_and_flags_override_it(runner, tiny_llama, chat_data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_llama),
                "dataset": str(chat_data),
                "template": "chatml",
                "max_steps": 3,
                "learning-rate": 0.002,
                "output_dir": str(tmp_path / "o"),
                "save_steps": None,
                "batch_size": 4,
            }
        )
    )
    result = invoke(runner, "run", "--config", config, "--max-steps", "2")
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "o" / "lmflow_run.json").read_text())
    assert record["config"]["max_steps"] == 2  # the flag wins
    assert record["config"]["learning_rate"] == 0.002  # the file's value (dash form accepted) stays
    assert record["result"]["global_step"] == 2


def test_plugin_flags_appear_in_help_once_the_plugin_is_named(runner, with_sample_plugin):
    plain = invoke(runner, "run", "--help").output
    assert "--sample-alpha" not in plain
    helped = invoke(runner, "run", "--plugins", "sample", "--help").output
    assert "Plugin: sample:" in helped
    for flag in (
        "--sample-alpha",
        "--sample-mode",
        "--sample-enabled / --no-sample-enabled",
        "--draft-model",
    ):
        assert flag in helped
    assert "[default: 0.5]" in helped


def test_plugin_options_from_flags_and_config_file(runner, with_sample_plugin, fast_run_args, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("plugins: [sample]\nsample:\n  mode: slow\n  alpha: 0.1\n")
    result = invoke(
        runner,
        *fast_run_args,
        "--config",
        config,
        "--sample-alpha",
        "0.75",
        "--no-sample-enabled",
        "--draft-model",
        "tiny",
        "--max-steps",
        "1",
    )
    assert result.exit_code == 0, result.stderr
    assert sample_plugin.SEEN == {"alpha": 0.75, "mode": "slow", "enabled": False, "draft_model": "tiny"}
    assert "plugins: sample 9.9" in result.output
    record = json.loads((tmp_path / "out" / "lmflow_run.json").read_text())
    assert record["plugins"] == [
        {"name": "sample", "version": "9.9", "source": "installed package lmflow-sample-tests"}
    ]
    assert record["config"]["sample"]["alpha"] == 0.75


def assert_clean_failure(result, code: int, *fragments: str):
    """One line on stderr naming the problem, a non-zero exit, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize(
    "extra, code, fragments",
    [
        (["--model", "./no/such/model"], 1, ["model ./no/such/model does not exist", "Check --model"]),
        (
            ["--model", "someone/unreachable-model"],
            1,
            ["model 'someone/unreachable-model' is not a local directory and could not be fetched"],
        ),
        (
            ["--template", "chatmll"],
            2,
            ["unknown template 'chatmll' (did you mean 'chatml'?)", "available: alpaca, ", " chatml, "],
        ),
        (["--plugins", "nosuch"], 2, ["unknown plugin 'nosuch'", "available: "]),
        (
            ["--batch-size", "0", "--learning-rate", "-1"],
            2,
            ["2 problems", "--batch-size must be at least 1", "--learning-rate must be greater than 0"],
        ),
        (["--bf16", "--fp16"], 2, ["--bf16 and --fp16 are both set"]),
        (["--fp16"], 2, ["--fp16 needs a CUDA GPU"]),
        (["--block-size", "4096"], 2, ["--block-size 4096 exceeds the model's context of 256 tokens"]),
        (["--eval-steps", "5"], 2, ["--eval-steps needs --eval-dataset"]),
        (["--resume", "/no/checkpoint"], 2, ["is not a checkpoint"]),
        (
            ["--learning-rate", "inf", "--epochs", "nan"],
            2,
            ["--learning-rate must be a finite number", "--epochs must be a finite number"],
        ),
        (["--optimizer", "adamw_nonsense"], 2, ["invalid training settings", "adamw_nonsense"]),
        (["--report-to", "no_such_tracker"], 2, ["invalid training settings", "no_such_tracker"]),
    ],
)
def test_user_errors_fail_before_anything_loads(
    runner, fast_run_args, tmp_path, model_loads, extra, code, fragments
):
    if "--fp16" in extra and torch.cuda.is_available():
        pytest.skip("fp16 is valid with a GPU")
    result = invoke(runner, *fast_run_args, *extra)
    assert_clean_failure(result, code, *fragments)
    assert model_loads == []
    assert not (tmp_path / "out").exists()


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_its_checks(runner, fast_run_args, tmp_path):
    assert invoke(runner, *fast_run_args).exit_code == 0
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert_clean_failure(
        invoke(runner, *fast_run_args, "--overwrite", "--template", "chatmll"), 2, "unknown template"
    )
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before


def test_resume_from_a_path_does_not_write_into_another_run_or_a_foreign_directory(
    runner, fast_run_args, tmp_path
):
    assert invoke(runner, *fast_run_args).exit_code == 0
    checkpoint = tmp_path / "out" / "checkpoint-2"
    other = [*fast_run_args, "--output-dir", tmp_path / "other"]  # the last --output-dir wins
    assert invoke(runner, *other).exit_code == 0
    result = invoke(runner, *other, "--resume", checkpoint)
    assert_clean_failure(result, 2, "already holds another run", "would mix them")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    args = [*fast_run_args, "--output-dir", foreign, "--resume", checkpoint]
    assert_clean_failure(invoke(runner, *args), 2, "does not hold an lmflow run")
    assert (foreign / "config.json").read_text() == "{}"


def test_bf16_trains_on_a_machine_without_an_accelerator(tiny_llama, chat_data, tmp_path):
    result = run(
        model=str(tiny_llama),
        dataset=str(chat_data),
        template="chatml",
        output_dir=str(tmp_path / "o"),
        max_steps=2,
        batch_size=4,
        bf16=True,
        save_steps=0,
    )
    assert result.global_step == 2


def test_malformed_dataset_fails_naming_file_and_record(runner, fast_run_args, tmp_path):
    bad = write_json(
        tmp_path / "bad.json",
        {"type": "conversation", "instances": [*conversations(3), {"messages": [{"role": "user"}]}]},
    )
    args = list(fast_run_args)
    args[args.index("--dataset") + 1] = bad
    assert_clean_failure(invoke(runner, *args), 2, "bad.json: instance 3: message 0 must be an object with")
    assert not (tmp_path / "out").exists()


def test_conversation_data_without_a_template_is_refused(runner, fast_run_args, tmp_path):
    args = list(fast_run_args)
    i = args.index("--template")
    del args[i : i + 2]
    assert_clean_failure(
        invoke(runner, *args), 2, "holds conversations, which need a template", "--template NAME"
    )


def test_unknown_config_key_and_unselected_plugin_section_are_reported_together(
    runner, fast_run_args, tmp_path
):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rat: 0.1\nlisa: {interval_steps: 3}\n")
    result = invoke(runner, *fast_run_args, "--config", config)
    assert_clean_failure(
        result,
        2,
        "unknown option 'learning_rat' (did you mean 'learning_rate'?)",
        "options given for plugin 'lisa'",
    )


def test_plugin_option_out_of_range_is_an_error(runner, with_sample_plugin, fast_run_args):
    result = invoke(runner, *fast_run_args, "--plugins", "sample", "--sample-alpha", "3")
    assert_clean_failure(result, 2, "option --sample-alpha (sample.alpha) must be at most 1.0, got 3.0")


def test_an_existing_run_is_never_clobbered(runner, fast_run_args, tmp_path):
    assert invoke(runner, *fast_run_args).exit_code == 0
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    result = invoke(runner, *fast_run_args)
    assert_clean_failure(result, 2, "already holds a completed run", "--resume", "--overwrite")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert invoke(runner, *fast_run_args, "--overwrite").exit_code == 0


def test_a_foreign_directory_is_not_overwritten(runner, fast_run_args, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    assert_clean_failure(invoke(runner, *fast_run_args, "--overwrite"), 2, "does not hold an lmflow run")
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_debug_shows_the_traceback(runner, fast_run_args, tmp_path):
    args = list(fast_run_args)
    args[args.index("--dataset") + 1] = tmp_path / "missing.json"
    assert_clean_failure(invoke(runner, *args), 2, "missing.json does not exist")
    with pytest.raises(DataError):
        invoke(runner, *args, "--debug")


def test_text2text_and_gpt2_architecture(tiny_gpt2, tmp_path):
    data = write_json(
        tmp_path / "p.json",
        {"type": "text2text", "instances": [{"input": f"Q{i}:", "output": f" A{i}."} for i in range(12)]},
    )
    result = run(
        model=str(tiny_gpt2),
        dataset=str(data),
        output_dir=str(tmp_path / "o"),
        max_steps=3,
        batch_size=4,
        save_steps=None,
        logging_steps=1,
    )
    assert result.global_step == 3
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").config.model_type == "gpt2"


def test_text_only_run_with_eval_steps(tiny_llama, text_data, tmp_path):
    result = run(
        model=str(tiny_llama),
        dataset=str(text_data),
        eval_dataset=str(text_data),
        output_dir=str(tmp_path / "o"),
        max_steps=4,
        batch_size=2,
        block_size=32,
        eval_steps=2,
        save_steps=None,
        logging_steps=2,
    )
    assert result.data["train"]["type"] == "text_only" and result.data["train"]["truncated"] == 0
    assert result.eval_metrics["perplexity"] > 1


@pytest.mark.slow
def test_the_embedded_demo_runs_offline_in_under_two_minutes_with_a_falling_loss(tmp_path):
    """`lmflow run` with no arguments, as a user types it (a fresh process, imports included)."""
    import subprocess
    import sys
    from pathlib import Path

    started = time.monotonic()
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lmflow")), "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "model: bundled demo (seeded initial weights)" in done.stdout
    losses = [
        float(line.split("loss ")[1].split(" ")[0])
        for line in done.stdout.splitlines()
        if line.startswith("step ")
    ]
    assert len(losses) > 10 and losses[-1] < losses[0] / 5, losses
    assert elapsed < 120, f"demo took {elapsed:.0f}s"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "output")
    assert model.config.model_type == "llama"


def test_every_run_option_is_documented_in_readme():
    from helpers import REPO

    from lmflow_core.config import core_fields

    readme = (REPO / "README.md").read_text()
    flags = ["--" + f.name.replace("_", "-") for f in core_fields()]
    flags = [flag.rstrip("s") if flag == "--sample-prompts" else flag for flag in flags]
    missing = [flag for flag in flags if f"| `{flag}" not in readme and f"/ `{flag}" not in readme]
    assert not missing, f"run options missing from README's options table: {missing}"


def test_resume_of_a_completed_run_without_checkpoints_is_refused(runner, fast_run_args, tmp_path):
    args = [*fast_run_args, "--save-steps", "0"]  # the last --save-steps wins
    assert invoke(runner, *args).exit_code == 0
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert_clean_failure(invoke(runner, *args, "--resume"), 2, "saved no checkpoint to continue from")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before


def test_a_template_given_for_text_data_is_reported_unused(runner, tiny_llama, text_data, tmp_path):
    result = invoke(
        runner,
        "run",
        "--model",
        tiny_llama,
        "--dataset",
        text_data,
        "--template",
        "chatml",
        "--output-dir",
        tmp_path / "o",
        "--max-steps",
        "1",
        "--block-size",
        "32",
    )
    assert result.exit_code == 0, result.stderr
    assert "note: --template chatml is not used: text_only data" in result.output


def test_the_saved_tokenizer_carries_the_training_template(tiny_llama, chat_data, tmp_path):
    from lmflow_core.catalog import get_template
    from lmflow_core.templates import Conversation, render_text

    run(
        model=str(tiny_llama),
        dataset=str(chat_data),
        template="llama3",
        output_dir=str(tmp_path / "o"),
        max_steps=1,
        save_steps=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "o")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}]
    expected = render_text(get_template("llama3").render(Conversation.from_messages(messages), True))
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
