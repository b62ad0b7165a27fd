"""The ``lora`` plugin: adapter outputs that peft and lmflow's inference commands load, DoRA, QLoRA's checks,
gradient checkpointing and bf16, exact resume, ``merge-lora``, and every error a user can cause."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, conversations, invoke, plugin_commands, stopped_run, write_json
from lmflow_plugins import lora
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmflow_core import hookimpl
from lmflow_core.train import configure, run

PROMPT = "<|im_start|>user\nWhat is 3 plus 1?<|im_end|>\n<|im_start|>assistant\n"
BLOCK_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


class Probe:
    """Keeps what a run's hooks see: whether checkpointing is on at each step, and the trained model's logits."""

    def __init__(self, tokenizer_dir: Path) -> None:
        self.ids = AutoTokenizer.from_pretrained(tokenizer_dir)(PROMPT, return_tensors="pt")["input_ids"]
        self.checkpointing: list[bool] = []
        self.logits: torch.Tensor | None = None
        self.trainable: list[str] = []

    @hookimpl
    def on_step(self, step):
        base = step.model.get_base_model()
        flag = getattr(base, "is_activation_checkpointing", None)
        self.checkpointing.append(bool(base.is_gradient_checkpointing if flag is None else flag))

    @hookimpl
    def on_train_end(self, model):
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        model.eval()
        with torch.no_grad():
            self.logits = model(self.ids).logits.clone()


def lora_run(base: Path, data: Path, out: Path, probe: Probe | None = None, **settings):
    defaults = {
        "model": str(base),
        "dataset": str(data),
        "template": "chatml",
        "output_dir": str(out),
        "max_steps": 4,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_steps": None,
        "plugins": ["lora"],
    }
    extra = {"probe": probe} if probe is not None else {}
    return run(**{**defaults, **settings}, extra_plugins=extra)


def logits_of(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def load_adapter(base: Path, adapter: Path):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("lora-data")
    write_json(tmp / "chat.json", {"type": "conversation", "instances": conversations()})
    write_json(tmp / "eval.json", {"type": "conversation", "instances": conversations(30)[24:]})
    return tmp


@pytest.fixture(scope="module")
def trained(tiny_llama, data_dir, tmp_path_factory):
    """A 4-step LoRA run of the tiny Llama (default target modules), evaluated at the end."""
    out = tmp_path_factory.mktemp("lora-run") / "out"
    probe = Probe(tiny_llama)
    result = lora_run(
        tiny_llama,
        data_dir / "chat.json",
        out,
        probe,
        eval_dataset=str(data_dir / "eval.json"),
        lora={"rank": 4},
    )
    return out, probe, result


def test_a_lora_run_writes_an_adapter_directory_that_peft_loads(tiny_llama, trained):
    out, probe, result = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "lmflow_run.json"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()  # the base weights are not copied
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama.resolve())
    assert config["r"] == 4 and config["lora_alpha"] == 16 and config["lora_dropout"] == 0.05
    # all-linear: every linear layer of both blocks, and not the LM head.
    assert {m.rsplit(".", 1)[-1] for m in config["target_modules"]} == BLOCK_LINEARS
    assert len(config["target_modules"]) == 2 * len(BLOCK_LINEARS)
    assert probe.trainable and all(".lora_A." in n or ".lora_B." in n for n in probe.trainable)

    record = json.loads((out / "lmflow_run.json").read_text())
    assert record["status"] == "completed" and record["template"] == "chatml"
    assert [p["name"] for p in record["plugins"]] == ["lora", "probe"]
    assert record["config"]["lora"]["rank"] == 4

    loaded = load_adapter(tiny_llama, out)
    assert torch.allclose(logits_of(loaded, probe.ids), probe.logits, atol=1e-6, rtol=0)
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(tiny_llama), probe.ids)
    assert (base_logits - probe.logits).abs().max() > 1e-3  # the adapter was trained
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert any(torch.count_nonzero(w) for k, w in weights.items() if "lora_B" in k)


def test_run_help_lists_the_lora_flags(runner):
    result = invoke(runner, "run", "--plugins", "lora", "--help")
    assert result.exit_code == 0
    for flag in (
        "--lora-rank",
        "--lora-alpha",
        "--lora-dropout",
        "--lora-target-modules",
        "--lora-modules-to-save",
        "--lora-dora",
        "--lora-qlora",
    ):
        assert flag in result.output, flag


def test_generate_and_evaluate_accept_the_adapter_directory(runner, tiny_llama, trained, data_dir, tmp_path):
    out, _, result = trained
    # evaluate: the reloaded adapter scores the eval data exactly as the trained model did at the end of the run.
    scores = {}
    for name, model in (("adapter", out), ("base", tiny_llama)):
        report = tmp_path / f"{name}.json"
        done = invoke(
            runner,
            "evaluate",
            model,
            "--dataset",
            data_dir / "eval.json",
            "--template",
            "chatml",
            "--output",
            report,
        )
        assert done.exit_code == 0, done.output + done.stderr
        scores[name] = json.loads(report.read_text())["metrics"]["nll_per_sample"]
    assert scores["adapter"] == pytest.approx(result.eval_metrics["nll_per_sample"], rel=1e-5)
    assert abs(scores["adapter"] - scores["base"]) > 1e-3

    # generate: the stored template is found through the adapter directory, and greedy decoding matches peft's.
    messages = write_json(tmp_path / "m.json", [{"role": "user", "content": "What is 3 plus 1?"}])
    done = invoke(runner, "generate", out, "--messages", messages, "--max-new-tokens", "6", "--no-stream")
    assert done.exit_code == 0, done.output + done.stderr
    loaded = load_adapter(tiny_llama, out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = loaded.generate(input_ids=ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    assert done.stdout.strip() == tokenizer.decode(expected, skip_special_tokens=True).strip()
    # Selecting the plugin for inference changes nothing (it only acts in training runs).
    again = invoke(
        runner, "generate", out, "--messages", messages, "--max-new-tokens", "6", "--plugins", "lora"
    )
    assert again.exit_code == 0 and again.stdout == done.stdout, again.stderr


@pytest.fixture
def merge_cli():
    """``lmflow merge-lora`` on the CLI object that the ``invoke`` helper runs."""
    yield from plugin_commands(lora, "merge-lora")


# --------------------------------------------------------------------------------------------------------------
# Options: DoRA, named target modules, modules to save, QLoRA
# --------------------------------------------------------------------------------------------------------------


def test_dora_with_named_targets_and_saved_modules_merges_to_the_same_logits(tiny_llama, data_dir, tmp_path):
    out = tmp_path / "dora"
    probe = Probe(tiny_llama)
    options = {"rank": 4, "dora": True, "target_modules": "q_proj, v_proj", "modules_to_save": "lm_head"}
    lora_run(tiny_llama, data_dir / "chat.json", out, probe, max_steps=3, lora=options)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert config["modules_to_save"] == ["lm_head"]
    names = load_file(str(out / "adapter_model.safetensors")).keys()
    assert any("lora_magnitude_vector" in n for n in names) and any("lm_head" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in probe.trainable if ".lora_" in n} == {
        "q_proj",
        "v_proj",
    }

    merged = lora.merge_lora(None, out, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert not hasattr(plain, "peft_config")
    difference = (
        (logits_of(plain, probe.ids) - logits_of(load_adapter(tiny_llama, out), probe.ids)).abs().max()
    )
    assert difference < 1e-4
    assert torch.allclose(logits_of(plain, probe.ids), probe.logits, atol=1e-4, rtol=0)


def test_qlora_asks_for_4_bit_weights_and_prepares_the_model_for_k_bit_training(
    tiny_llama, chat_data, tmp_path, monkeypatch
):
    import peft

    with monkeypatch.context() as machine:  # a GPU machine with bitsandbytes
        machine.setattr(torch.cuda, "is_available", lambda: True)
        machine.setattr(lora, "bitsandbytes_installed", lambda: True)
        config, _ = configure(
            model=str(tiny_llama),
            dataset=str(chat_data),
            output_dir=str(tmp_path / "o"),
            bf16=True,
            plugins=["lora"],
            lora={"qlora": True},
        )
    kwargs = lora.model_init_kwargs(config)
    quantization = kwargs["quantization_config"]
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"
    assert quantization.bnb_4bit_compute_dtype == torch.bfloat16 and kwargs["device_map"] == {"": 0}
    config.plugin_options["lora"]["qlora"] = False
    assert lora.model_init_kwargs(config) is None
    config.plugin_options["lora"]["qlora"] = True

    prepared = []
    real = peft.prepare_model_for_kbit_training

    def spy(model, **kw):
        prepared.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", spy)
    wrapped = lora.prepare_model(config, AutoModelForCausalLM.from_pretrained(tiny_llama), None)
    assert isinstance(wrapped, PeftModel) and prepared == [
        {"use_gradient_checkpointing": False, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_qlora_without_cuda_is_refused_before_anything_loads(runner, fast_run_args, tmp_path):
    result = invoke(runner, *fast_run_args, "--plugins", "lora", "--lora-qlora")
    assert_one_line_error(result, "--lora-qlora needs a CUDA GPU", "drop --lora-qlora")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()


def test_qlora_without_bitsandbytes_says_how_to_install_it(runner, fast_run_args, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec then reports it missing
    result = invoke(runner, *fast_run_args, "--plugins", "lora", "--lora-qlora")
    assert_one_line_error(result, "needs bitsandbytes", "pip install bitsandbytes")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# Composition with gradient checkpointing and bf16; resume
# --------------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_and_bf16_compose_with_lora(tiny_llama, data_dir, tmp_path):
    data = data_dir / "chat.json"
    plain, checkpointed, bf16 = Probe(tiny_llama), Probe(tiny_llama), Probe(tiny_llama)
    reference = lora_run(tiny_llama, data, tmp_path / "plain", plain, max_steps=3)
    with_checkpointing = lora_run(
        tiny_llama, data, tmp_path / "gc", checkpointed, max_steps=3, gradient_checkpointing=True
    )
    assert plain.checkpointing == [False] * 3 and checkpointed.checkpointing == [True] * 3
    # Recomputing activations (dropout included) changes nothing but memory.
    assert [loss for _, loss in with_checkpointing.losses] == pytest.approx(
        [loss for _, loss in reference.losses], rel=1e-6
    )
    expected = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    actual = load_file(str(tmp_path / "gc" / "adapter_model.safetensors"))
    assert all(torch.allclose(expected[k], actual[k], atol=1e-6, rtol=0) for k in expected)

    in_bf16 = lora_run(
        tiny_llama, data, tmp_path / "bf16", bf16, max_steps=3, bf16=True, gradient_checkpointing=True
    )
    assert bf16.checkpointing == [True] * 3
    bf16_losses, fp32_losses = [x for _, x in in_bf16.losses], [x for _, x in reference.losses]
    assert bf16_losses != fp32_losses  # the forward really ran in bfloat16...
    assert bf16_losses == pytest.approx(fp32_losses, abs=0.05)  # ...and trained the same way
    weights = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())  # adapters train in fp32 under autocast


def resume_args(tiny_llama, data, out) -> list:
    return [
        "run",
        "--model",
        tiny_llama,
        "--dataset",
        data,
        "--template",
        "chatml",
        "--output-dir",
        out,
        "--plugins",
        "lora",
        "--lora-rank",
        "4",
        "--lora-alpha",
        "8",
        "--max-steps",
        "6",
        "--save-steps",
        "3",
        "--batch-size",
        "4",
        "--learning-rate",
        "1e-2",
        "--logging-steps",
        "1",
    ]


def test_a_resumed_lora_run_ends_with_the_uninterrupted_runs_adapter(
    runner, tiny_llama, data_dir, tmp_path, monkeypatch
):
    data = data_dir / "chat.json"
    straight = tmp_path / "straight"
    monkeypatch.chdir(tiny_llama.parent)  # the base is given as a relative path
    base = Path(tiny_llama.name)
    assert invoke(runner, *resume_args(base, data, straight)).exit_code == 0
    assert (straight / "checkpoint-3" / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((straight / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_llama.resolve())  # valid from anywhere

    # What a run stopped after its first checkpoint leaves behind, in a fresh directory.
    stopped = tmp_path / "stopped"
    stopped_run(straight, "checkpoint-3", stopped)
    refused = invoke(runner, *resume_args(base, data, stopped), "--resume", "--lora-rank", "8")
    assert_one_line_error(
        refused, "trained with other LoRA settings (rank 4, alpha 8", "Resume with the --lora-*"
    )
    assert not (stopped / "adapter_model.safetensors").exists()
    refused = invoke(
        runner, *resume_args(base, data, stopped), "--resume", "--lora-target-modules", "q_proj,v_proj"
    )
    assert_one_line_error(refused, "trained with other LoRA modules", "--lora-target-modules")

    resumed = invoke(runner, *resume_args(base, data, stopped), "--resume")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert "resuming at step 3" in resumed.output
    expected = load_file(str(straight / "adapter_model.safetensors"))
    actual = load_file(str(stopped / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_resuming_a_checkpoint_without_an_adapter_is_refused(runner, fast_run_args, tmp_path):
    assert invoke(runner, *fast_run_args, "--max-steps", "2").exit_code == 0  # full fine-tuning
    result = invoke(runner, *fast_run_args, "--plugins", "lora", "--resume")
    assert_one_line_error(result, "holds no LoRA adapter", "start a new run")


# --------------------------------------------------------------------------------------------------------------
# merge-lora
# --------------------------------------------------------------------------------------------------------------


def test_merge_lora_writes_a_plain_model_with_the_adapters_logits(
    runner, merge_cli, tiny_llama, trained, tmp_path
):
    out, probe, _ = trained
    merged = tmp_path / "merged"
    result = invoke(runner, "merge-lora", "--adapter", out, "--output", merged)  # --base: the adapter's
    assert result.exit_code == 0, result.output + result.stderr
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "lmflow_run.json",
    ):
        assert (merged / name).is_file(), name
    assert not (merged / "adapter_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind

    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    adapted = logits_of(load_adapter(tiny_llama, out), probe.ids)
    assert (logits_of(plain, probe.ids) - adapted).abs().max() < 1e-4

    record = json.loads((merged / "lmflow_run.json").read_text())
    assert record["template"] == "chatml"
    assert record["merged_from"] == {"base": str(tiny_llama.resolve()), "adapter": str(out.resolve())}
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(out).get_vocab()
    assert "<|im_start|>" in tokenizer.chat_template


def test_merge_lora_refuses_an_occupied_output_unless_overwrite(runner, merge_cli, trained, tmp_path):
    out = trained[0]
    target = tmp_path / "merged"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    refused = invoke(runner, "merge-lora", "--adapter", out, "--output", target)
    assert_one_line_error(refused, f"--output {target} already exists", "--overwrite")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

    # --overwrite replaces only what lmflow wrote: a user's file stops it.
    refused = invoke(runner, "merge-lora", "--adapter", out, "--output", target, "--overwrite")
    assert_one_line_error(refused, "was not written by lmflow", "nothing was deleted")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    (target / "notes.txt").unlink()
    assert invoke(runner, "merge-lora", "--adapter", out, "--output", target).exit_code == 0
    first = (target / "model.safetensors").read_bytes()
    (target / "notes.txt").write_text("keep me")  # dropped into lmflow's output afterwards
    refused = invoke(runner, "merge-lora", "--adapter", out, "--output", target, "--overwrite")
    assert_one_line_error(refused, "holds files lmflow did not write (notes.txt)")
    assert (target / "notes.txt").read_text() == "keep me"
    (target / "notes.txt").unlink()
    replaced = invoke(runner, "merge-lora", "--adapter", out, "--output", target, "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    assert (target / "model.safetensors").read_bytes() == first and (target / "lmflow_output.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


MERGE_ERRORS = {
    "missing": ("does not exist", "Pass --adapter the output directory of a LoRA run"),
    "not-an-adapter": ("is not a peft adapter directory", "Pass --adapter"),
    "missing-base": ("does not exist", "Check --base"),
    "wrong-base": ("does not fit the base model", "Pass --base the model the adapter was trained on"),
    "output-is-adapter": ("is or contains the input", "Choose a --output outside the inputs"),
    "output-contains-adapter": ("is or contains the input", "writing there would delete it"),
}


@pytest.mark.parametrize("case", list(MERGE_ERRORS))
def test_merge_lora_errors_are_one_line_and_write_nothing(
    runner, merge_cli, trained, tiny_gpt2, tmp_path, case
):
    adapter, output, extra = trained[0], tmp_path / "merged", []
    if case == "missing":
        adapter = tmp_path / "nowhere"
    elif case == "not-an-adapter":
        adapter = tmp_path / "plain"
        adapter.mkdir()
    elif case == "missing-base":
        extra = ["--base", tmp_path / "no-such-model"]
    elif case == "wrong-base":
        extra = ["--base", tiny_gpt2]  # has none of the Llama layers the adapter targets
    elif case == "output-is-adapter":
        output = adapter
    else:  # even with --overwrite, the directory holding the adapter is not replaced
        output, extra = adapter.parent, ["--overwrite"]
    result = invoke(runner, "merge-lora", "--adapter", adapter, "--output", output, *extra)
    assert_one_line_error(result, *MERGE_ERRORS[case])
    if case.startswith("output-"):
        assert (adapter / "adapter_config.json").is_file()
    else:
        assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_merge_lora_is_registered_through_the_entry_point():
    from lmflow_core import cli as cli_module

    before = set(cli_module.cli.commands)
    cli_module._register_plugin_commands()
    try:
        assert "merge-lora" in cli_module.cli.commands
    finally:
        for name in set(cli_module.cli.commands) - before:
            cli_module.cli.commands.pop(name)


@pytest.mark.slow
def test_merge_lora_from_the_installed_command_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmflow_core.cli",
            "merge-lora",
            "--adapter",
            tmp_path / "a",
            "--output",
            tmp_path / "o",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(f"Error: adapter directory {tmp_path / 'a'} does not exist")
    )


# --------------------------------------------------------------------------------------------------------------
# Errors a user can cause in a run: one line, non-zero exit, nothing written
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--lora-rank", "0"], ["--lora-rank", "must be at least 1, got 0"]),
        (["--lora-dropout", "1"], ["--lora-dropout must be a probability in [0, 1), got 1", "use e.g. 0.05"]),
        (["--lora-dropout", "-0.1"], ["--lora-dropout must be a probability in [0, 1), got -0.1"]),
        (
            ["--lora-target-modules", "q_proj,qkv_proj"],
            [
                "--lora-target-modules: 'qkv_proj' matches no module",
                "q_proj, k_proj, v_proj, o_proj",
                "all-linear",
            ],
        ),
        (["--lora-target-modules", " , "], ["--lora-target-modules is empty"]),
        (["--lora-target-modules", "all-linear,q_proj"], ["pass it alone"]),
        (["--lora-modules-to-save", "lm_heads"], ["'lm_heads' matches no module", "lm_head"]),
        (
            ["--random-init"],
            [
                "--random-init builds a randomly initialised model",
                "pass --model with a saved model",
                "drop --random-init",
            ],
        ),
    ],
)
def test_bad_lora_settings_fail_with_one_line_and_nothing_written(
    runner, fast_run_args, tmp_path, monkeypatch, flags, fragments
):
    def no_weights(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the settings were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    result = invoke(runner, *fast_run_args, "--plugins", "lora", *flags)
    assert_one_line_error(result, *fragments)
    assert result.exit_code == 2 and not (tmp_path / "out").exists()


def test_lora_on_an_adapter_directory_is_refused(runner, trained, chat_data, tmp_path):
    args = ["run", "--model", trained[0], "--dataset", chat_data, "--template", "chatml"]
    result = invoke(runner, *args, "--output-dir", tmp_path / "out", "--plugins", "lora")
    assert_one_line_error(
        result, "is a LoRA adapter, not a model", "merge it first (lmflow merge-lora --adapter"
    )
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
