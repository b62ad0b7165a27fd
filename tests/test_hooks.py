"""Every hook is called when and how its docstring says, on a real (tiny) training run.

The last tests fail when a hook is added without a test here or without a section in README.md.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
from pathlib import Path

import pytest
import torch
from helpers import REPO, add_to_catalog
from transformers import TrainerCallback

from lmflow_core import PluginOption, hookimpl, run
from lmflow_core.errors import ConfigError, LmflowError
from lmflow_core.plugins import hook_names
from lmflow_core.templates import Segment, TurnTemplate


class Recorder:
    """A plugin implementing every run hook; records calls and changes what it may."""

    def __init__(self):
        self.calls: list[str] = []
        self.seen: dict[str, object] = {}

    @hookimpl
    def declare_options(self):
        self.calls.append("declare_options")
        return [PluginOption("factor", float, 2.0, "A test option.", min=1.0)]

    @hookimpl
    def declare_conflicts(self):
        self.calls.append("declare_conflicts")
        return {"nonexistent": "never selected"}

    @hookimpl
    def validate_config(self, config):
        self.calls.append("validate_config")
        self.seen["factor"] = config.options_for("recorder").factor
        return []

    @hookimpl
    def load_tokenizer(self, config):
        self.calls.append("load_tokenizer")
        return None  # defer to the core

    @hookimpl
    def configure_model(self, config, model_config):
        self.calls.append("configure_model")
        model_config.recorder_marker = "configured"

    @hookimpl
    def model_init_kwargs(self, config):
        self.calls.append("model_init_kwargs")
        return {"attn_implementation": "eager"}

    @hookimpl
    def load_model(self, config, model_config, init_kwargs):
        self.calls.append("load_model")
        self.seen["init_kwargs"] = dict(init_kwargs)
        return None

    @hookimpl
    def prepare_model(self, config, model, tokenizer):
        self.calls.append("prepare_model")
        self.seen["attn"] = model.config._attn_implementation
        model.get_input_embeddings().weight.requires_grad_(False)  # freeze embeddings, as a plugin might
        return None

    @hookimpl
    def format_conversation(self, template, conversation, add_generation_prompt, tokenizer):
        self.calls.append("format_conversation")
        return None

    @hookimpl
    def prepare_dataset(self, config, dataset, tokenizer, split):
        self.calls.append(f"prepare_dataset:{split}")
        return dataset.select(range(min(len(dataset), 8))) if split == "train" else None

    @hookimpl
    def data_collator(self, config, tokenizer):
        self.calls.append("data_collator")
        return None

    @hookimpl
    def adjust_training_args(self, config, training_args):
        self.calls.append("adjust_training_args")
        training_args["weight_decay"] = 0.125

    @hookimpl
    def trainer_callbacks(self, config):
        from transformers import TrainerCallback

        recorder = self

        class Begin(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                recorder.calls.append("callback:on_train_begin")
                recorder.seen["weight_decay"] = args.weight_decay

        self.calls.append("trainer_callbacks")
        return [Begin()]

    @hookimpl
    def wrap_optimizer(self, config, model, optimizer):
        self.calls.append("wrap_optimizer")
        self.seen["optimizer_params"] = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        return None

    @hookimpl
    def on_step(self, config, step):
        self.calls.append(f"on_step:{step.global_step}")
        self.seen.setdefault("step_loss", []).append(step.loss)
        self.seen["lr_scheduler"] = step.lr_scheduler

    @hookimpl
    def on_train_end(self, config, model, tokenizer, output_dir):
        self.calls.append("on_train_end")
        (__import__("pathlib").Path(output_dir) / "recorder.txt").write_text("done")

    @hookimpl
    def evaluate(self, config, model, tokenizer, dataset):
        self.calls.append("evaluate")
        return {"recorder_examples": len(dataset)}

    @hookimpl
    def decode(self, model, tokenizer, input_ids, options, streamer):
        self.calls.append("decode")
        self.seen["decode_prompt"] = tokenizer.decode(input_ids[0])
        self.seen["decode_options"] = options
        return None


@pytest.fixture(scope="module")
def recorded_run(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hooks")
    from helpers import conversations, write_json

    data = write_json(tmp / "chat.json", {"type": "conversation", "instances": conversations(16)})
    recorder = Recorder()
    result = run(
        model=str(tiny_llama),
        dataset=str(data),
        eval_dataset=str(data),
        template="chatml",
        output_dir=str(tmp / "out"),
        max_steps=3,
        batch_size=4,
        logging_steps=1,
        save_steps=None,
        sample_prompts=["What is 2 plus 1?"],
        extra_plugins={"recorder": recorder},
        recorder={"factor": 3},
    )
    return recorder, result, tmp / "out"


def test_hook_declare_options_values_reach_the_plugin(recorded_run):
    recorder, _, _ = recorded_run
    assert recorder.seen["factor"] == 3.0  # given as int 3, coerced to the declared float


def test_hook_declare_conflicts_with_an_unselected_plugin_is_harmless(recorded_run):
    assert "declare_conflicts" in recorded_run[0].calls


def test_hook_validate_config_problems_from_all_plugins_are_reported_together(
    tiny_llama, chat_data, tmp_path
):
    one = types.SimpleNamespace(validate_config=hookimpl(lambda config: ["first problem"]))
    two = types.SimpleNamespace(validate_config=hookimpl(lambda config: ["second problem"]))
    with pytest.raises(ConfigError, match=r"2 problems .*\(1\) first problem; \(2\) second problem"):
        run(
            model=str(tiny_llama),
            dataset=str(chat_data),
            template="chatml",
            output_dir=str(tmp_path / "o"),
            extra_plugins={"one": one, "two": two},
        )
    assert not (tmp_path / "o").exists()


def test_hook_load_tokenizer_first_result_wins(tiny_llama, chat_data, tmp_path):
    from transformers import AutoTokenizer

    loaded = []

    def load_tokenizer(config):
        tok = AutoTokenizer.from_pretrained(config.model)
        loaded.append(tok)
        return tok

    plugin = types.SimpleNamespace(load_tokenizer=hookimpl(load_tokenizer))
    run(
        model=str(tiny_llama),
        dataset=str(chat_data),
        template="chatml",
        output_dir=str(tmp_path / "o"),
        max_steps=1,
        save_steps=None,
        extra_plugins={"tok": plugin},
    )
    assert len(loaded) == 1


def test_hook_configure_model_changes_are_saved_with_the_model(recorded_run):
    import json

    _, _, out = recorded_run
    assert json.loads((out / "config.json").read_text())["recorder_marker"] == "configured"


def test_hook_model_init_kwargs_reach_load_model(recorded_run):
    recorder = recorded_run[0]
    assert recorder.seen["init_kwargs"] == {"attn_implementation": "eager"}
    assert recorder.seen["attn"] == "eager"


def test_hook_model_init_kwargs_conflicting_values_fail(tiny_llama, chat_data, tmp_path):
    a = types.SimpleNamespace(model_init_kwargs=hookimpl(lambda config: {"attn_implementation": "eager"}))
    b = types.SimpleNamespace(model_init_kwargs=hookimpl(lambda config: {"attn_implementation": "sdpa"}))
    with pytest.raises(
        LmflowError, match="plugins 'a' and 'b' set the model argument 'attn_implementation' differently"
    ):
        run(
            model=str(tiny_llama),
            dataset=str(chat_data),
            template="chatml",
            output_dir=str(tmp_path / "o"),
            extra_plugins={"a": a, "b": b},
        )


def test_hook_load_model_replaces_the_default(tiny_llama, chat_data, tmp_path):
    from transformers import AutoModelForCausalLM

    def load_model(config, init_kwargs):
        model = AutoModelForCausalLM.from_pretrained(config.model, **init_kwargs)
        model.loaded_by_plugin = True
        return model

    def prepare_model(model):
        assert model.loaded_by_plugin

    plugin = types.SimpleNamespace(load_model=hookimpl(load_model), prepare_model=hookimpl(prepare_model))
    run(
        model=str(tiny_llama),
        dataset=str(chat_data),
        template="chatml",
        output_dir=str(tmp_path / "o"),
        max_steps=1,
        save_steps=None,
        extra_plugins={"loader": plugin},
    )


def test_hook_prepare_model_frozen_parameters_stay_frozen(recorded_run, tiny_llama):
    from safetensors.torch import load_file

    _, _, out = recorded_run
    before = load_file(str(tiny_llama / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(
        before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"]
    )


def test_hook_normalize_record_accepts_a_new_record_shape_and_keeps_extra_columns(tiny_llama, tmp_path):
    from helpers import write_json

    from lmflow_core.errors import DataError

    records = [{"q": f"What is {i} plus 1?", "a": f"{i + 1}.", "source": f"quiz-{i}"} for i in range(8)]
    data = write_json(tmp_path / "quiz.json", records)
    columns = {}

    def normalize_record(record, declared_type, where):
        if "q" not in record:
            return None
        if not record["a"].strip():
            raise DataError(f"{where}: empty answer")
        messages = [{"role": "user", "content": record["q"]}, {"role": "assistant", "content": record["a"]}]
        return "conversation", {"system": None, "messages": messages, "source": record["source"]}

    def prepare_dataset(dataset, split):
        columns[split] = (dataset.column_names, dataset[0]["source"])

    plugin = types.SimpleNamespace(
        normalize_record=hookimpl(normalize_record), prepare_dataset=hookimpl(prepare_dataset)
    )
    result = run(
        model=str(tiny_llama),
        dataset=str(data),
        template="chatml",
        output_dir=str(tmp_path / "o"),
        max_steps=1,
        save_steps=0,
        extra_plugins={"quiz": plugin},
    )
    assert result.data["train"]["records"] == 8
    names, source = columns["train"]
    assert {"input_ids", "labels", "attention_mask", "source"} <= set(names) and source == "quiz-0"
    write_json(tmp_path / "quiz.json", [*records, {"q": "?", "a": " ", "source": "x"}])
    with pytest.raises(DataError, match=r"quiz\.json: record 8: empty answer"):
        run(
            model=str(tiny_llama),
            dataset=str(data),
            template="chatml",
            output_dir=str(tmp_path / "o2"),
            extra_plugins={"quiz": plugin},
        )


def test_hook_format_conversation_override_changes_the_training_text(tiny_llama, tmp_path):
    from helpers import conversations, write_json

    data = write_json(tmp_path / "c.json", {"type": "conversation", "instances": conversations(4)})
    rendered = []

    def format_conversation(conversation, add_generation_prompt):
        text = " / ".join(m.content for m in conversation.messages)
        rendered.append(text)
        return [Segment("Q: "), Segment(text, trained=True)]

    plugin = types.SimpleNamespace(format_conversation=hookimpl(format_conversation))
    result = run(
        model=str(tiny_llama),
        dataset=str(data),
        template="chatml",
        output_dir=str(tmp_path / "o"),
        max_steps=1,
        save_steps=None,
        extra_plugins={"fmt": plugin},
    )
    assert rendered[0] == "What is 0 plus 1? / 0 plus 1 is 1."
    assert result.data["train"]["trained_tokens"] < result.data["train"]["tokens"]


def test_hook_prepare_dataset_runs_for_each_split(recorded_run):
    recorder, result, _ = recorded_run
    assert "prepare_dataset:train" in recorder.calls and "prepare_dataset:eval" in recorder.calls


def test_hook_data_collator_replaces_the_default(tiny_llama, chat_data, tmp_path):
    from transformers import DataCollatorForSeq2Seq

    batches = []

    def data_collator(tokenizer):
        base = DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=40)

        def collate(features):
            batch = base(features)
            batches.append(batch["input_ids"].shape)
            return batch

        return collate

    plugin = types.SimpleNamespace(data_collator=hookimpl(data_collator))
    run(
        model=str(tiny_llama),
        dataset=str(chat_data),
        template="chatml",
        output_dir=str(tmp_path / "o"),
        max_steps=2,
        batch_size=2,
        save_steps=None,
        extra_plugins={"coll": plugin},
    )
    assert batches and all(shape == (2, 40) for shape in batches)


def test_hook_adjust_training_args_reaches_the_trainer(recorded_run):
    assert recorded_run[0].seen["weight_decay"] == 0.125


def test_hook_trainer_callbacks_are_attached(recorded_run):
    assert "callback:on_train_begin" in recorded_run[0].calls


def test_hook_wrap_optimizer_sees_only_trainable_parameters(recorded_run, tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings().weight.numel()
    assert recorded_run[0].seen["optimizer_params"] == total - embeddings


def test_hook_wrap_optimizer_replacement_is_used(tiny_llama, chat_data, tmp_path):
    steps = []

    class Counting(torch.optim.SGD):
        def step(self, closure=None):
            steps.append(1)
            return super().step(closure)

    def wrap_optimizer(model, optimizer):
        return Counting([p for p in model.parameters() if p.requires_grad], lr=0.01)

    plugin = types.SimpleNamespace(wrap_optimizer=hookimpl(wrap_optimizer))
    run(
        model=str(tiny_llama),
        dataset=str(chat_data),
        template="chatml",
        output_dir=str(tmp_path / "o"),
        max_steps=3,
        save_steps=None,
        extra_plugins={"opt": plugin},
    )
    assert len(steps) == 3


def test_hook_compute_loss_replaces_the_loss_and_logs_its_metrics(tiny_llama, chat_data, tmp_path):
    """The hook's loss is what the optimizer minimises and what is logged (divided over accumulation steps);
    its metrics are averaged between log lines and logged beside the loss, in evaluation too."""
    seen = []

    def compute_loss(model, inputs, num_items_in_batch):
        seen.append((model.training, inputs["input_ids"].shape[0]))
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        # a loss of its own: the mean squared logit (the language-modelling loss would go up, not this)
        loss = out.logits.float().pow(2).mean()
        return loss, {"mean_logit_sq": loss.detach(), "constant": 2.0}

    logged = []

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    plugin = types.SimpleNamespace(
        compute_loss=hookimpl(compute_loss), trainer_callbacks=hookimpl(lambda: [Logs()])
    )
    result = run(
        model=str(tiny_llama),
        dataset=str(chat_data),
        eval_dataset=str(chat_data),
        eval_steps=4,
        template="chatml",
        output_dir=str(tmp_path / "o"),
        max_steps=4,
        batch_size=2,
        grad_accum=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=None,
        extra_plugins={"sq": plugin},
    )
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < losses[0] / 2  # the optimizer minimised the hook's loss
    assert sum(1 for training, _ in seen if training) == 4 * 2  # every micro-batch went through the hook
    assert any(not training for training, _ in seen)  # and the evaluation batches
    train_logs = [h for h in logged if "loss" in h]
    assert len(train_logs) == 4 and all(h["constant"] == 2.0 for h in train_logs)
    # the logged loss is the mean over the step's micro-batches (the core divided by the accumulation steps),
    # equal to the averaged metric
    assert [h["mean_logit_sq"] for h in train_logs] == pytest.approx(
        [h["loss"] for h in train_logs], rel=1e-3
    )
    assert any("eval_mean_logit_sq" in h and "eval_constant" in h for h in logged)


def test_hook_on_step_runs_after_every_optimizer_step_with_the_loss(recorded_run):
    recorder, result, _ = recorded_run
    assert [c for c in recorder.calls if c.startswith("on_step")] == ["on_step:1", "on_step:2", "on_step:3"]
    assert recorder.seen["lr_scheduler"] is not None
    # the loss the hook sees after step 2 is the loss the trainer logs for step 2.
    assert recorder.seen["step_loss"][1] == pytest.approx(dict(result.losses)[2])


def _stateful_runs(tiny_llama, chat_data, tmp_path):
    """Train 4 steps saving every 2 with a stateful plugin, then resume to 6 with a fresh instance."""

    class Stateful:
        def __init__(self):
            self.steps_seen = 0
            self.loaded = None
            self.saved_in = []

        @hookimpl
        def on_step(self, step):
            self.steps_seen += 1

        @hookimpl
        def on_checkpoint_save(self, checkpoint_dir, is_main_process):
            self.saved_in.append(Path(checkpoint_dir))
            # the checkpoint is still in staging while plugins write to it
            assert Path(checkpoint_dir).parent.name.startswith(".staging-")
            assert (Path(checkpoint_dir) / "trainer_state.json").is_file()
            if is_main_process:
                (Path(checkpoint_dir) / "stateful.json").write_text(json.dumps({"steps": self.steps_seen}))

        @hookimpl
        def on_checkpoint_load(self, checkpoint_dir):
            self.loaded = json.loads((Path(checkpoint_dir) / "stateful.json").read_text())

    out = tmp_path / "out"
    settings = dict(
        model=str(tiny_llama),
        dataset=str(chat_data),
        template="chatml",
        output_dir=str(out),
        save_steps=2,
        batch_size=4,
    )
    first = Stateful()
    run(max_steps=4, extra_plugins={"stateful": first}, **settings)
    second = Stateful()
    run(max_steps=6, resume="latest", extra_plugins={"stateful": second}, **settings)
    return first, second, out


def test_hook_on_checkpoint_save_writes_into_the_staged_checkpoint(tiny_llama, chat_data, tmp_path):
    first, second, out = _stateful_runs(tiny_llama, chat_data, tmp_path)
    assert [p.name for p in first.saved_in] == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((out / "checkpoint-4" / "stateful.json").read_text()) == {"steps": 4}
    assert json.loads((out / "checkpoint-6" / "stateful.json").read_text()) == {"steps": 2}


def test_hook_on_checkpoint_load_restores_state_on_resume(tiny_llama, chat_data, tmp_path):
    first, second, _ = _stateful_runs(tiny_llama, chat_data, tmp_path)
    assert first.loaded is None
    assert second.loaded == {"steps": 4}


def test_hook_on_train_end_runs_after_the_final_save(recorded_run):
    recorder, _, out = recorded_run
    assert (out / "recorder.txt").read_text() == "done"
    assert recorder.calls.index("on_train_end") > recorder.calls.index("on_step:3")


def test_hook_evaluate_results_are_merged_with_the_core_metrics(recorded_run):
    _, result, _ = recorded_run
    assert result.eval_metrics["recorder_examples"] == 16
    assert {"nll_per_sample", "nll_per_token", "perplexity"} <= set(result.eval_metrics)


def test_without_eval_data_only_evaluate_hooks_that_score_their_own_data_are_called(tiny_llama, tmp_path):
    from helpers import conversations, write_json

    from lmflow_core import hookimpl

    class NeedsData:  # written for evaluation data: never called without it
        @hookimpl
        def evaluate(self, config, model, tokenizer, dataset):
            return {"examples": len(dataset)}

    class OwnData:  # scores data of its own: takes no dataset
        @hookimpl
        def evaluate(self, config, model):
            return {"own_score": 1.0}

    data = write_json(tmp_path / "chat.json", conversations(8))
    result = run(
        model=str(tiny_llama),
        dataset=str(data),
        template="chatml",
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        extra_plugins={"needs_data": NeedsData(), "own_data": OwnData()},
    )
    assert result.eval_metrics == {"own_score": 1.0}


def test_hook_decode_is_used_for_samples(recorded_run):
    recorder, result, _ = recorded_run
    assert "decode" in recorder.calls and len(result.samples) == 1
    # The sample prompt is the template's rendering with the generation prompt, as at inference.
    assert (
        recorder.seen["decode_prompt"]
        == "<|im_start|>user\nWhat is 2 plus 1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        recorder.seen["decode_options"].greedy
        and "<|im_end|>" in recorder.seen["decode_options"].stop_strings
    )


def test_hook_register_templates_adds_a_template_usable_by_name(monkeypatch):
    from lmflow_core.catalog import available_templates, get_template

    extra = TurnTemplate(name="bracket", user="[{content}]", assistant="{content}!")
    add_to_catalog(
        monkeypatch, types.SimpleNamespace(register_templates=hookimpl(lambda: [extra])), "bracket_plugin"
    )
    assert "bracket" in available_templates() and "chatml" in available_templates()
    assert get_template("bracket") is extra


def test_hook_register_commands_adds_a_cli_command(monkeypatch):
    import click
    from click.testing import CliRunner

    from lmflow_core import cli as cli_module

    def register_commands(cli):
        @cli.command("hello-test")
        def hello():
            click.echo("hello from a plugin")

    add_to_catalog(
        monkeypatch, types.SimpleNamespace(register_commands=hookimpl(register_commands)), "hello_plugin"
    )
    cli_module._register_plugin_commands()
    try:
        result = CliRunner().invoke(cli_module.cli, ["hello-test"])
        assert result.output == "hello from a plugin\n"
    finally:
        cli_module.cli.commands.pop("hello-test", None)


def test_run_hooks_are_called_in_phase_order(recorded_run):
    calls = recorded_run[0].calls
    order = [
        "declare_conflicts",
        "declare_options",
        "validate_config",
        "configure_model",
        "adjust_training_args",
        "load_tokenizer",
        "format_conversation",
        "prepare_dataset:train",
        "model_init_kwargs",
        "load_model",
        "prepare_model",
        "trainer_callbacks",
        "data_collator",
        "wrap_optimizer",
        "on_step:1",
        "on_train_end",
        "evaluate",
        "decode",
    ]
    positions = [calls.index(name) for name in order]
    assert positions == sorted(positions), calls


def test_every_hook_has_a_test_in_this_file():
    source = (REPO / "tests" / "test_hooks.py").read_text()
    missing = [name for name in hook_names() if f"def test_hook_{name}" not in source]
    assert not missing, f"hooks without a test_hook_<name> test: {missing}"


def test_every_hook_has_a_readme_section():
    readme = (REPO / "README.md").read_text()
    missing = [name for name in hook_names() if not re.search(rf"^#### `{name}\(", readme, re.M)]
    assert not missing, f"hooks without a README section: {missing}"


def test_tokenization_cache_key_follows_the_code_of_python_plugin_objects():
    from lmflow_core.data.pipeline import formatter_fingerprint
    from lmflow_core.plugins import select_plugins

    def plain(conversation):
        return None

    def shouting(conversation):
        return [Segment("X", trained=True)]

    first = formatter_fingerprint(
        select_plugins([], extra=[("fmt", types.SimpleNamespace(format_conversation=hookimpl(plain)))])
    )
    again = formatter_fingerprint(
        select_plugins([], extra=[("fmt", types.SimpleNamespace(format_conversation=hookimpl(plain)))])
    )
    other = formatter_fingerprint(
        select_plugins([], extra=[("fmt", types.SimpleNamespace(format_conversation=hookimpl(shouting)))])
    )
    assert first == again and first != other


def test_hook_prepare_inference_runs_once_when_a_session_opens(tiny_llama):
    from lmflow_core.inference import open_session

    calls = []

    def prepare_inference(config, model, tokenizer):
        calls.append(config.model)
        model.lmflow_marker = "ready"

    plugin = types.SimpleNamespace(prepare_inference=hookimpl(prepare_inference))
    session = open_session(str(tiny_llama), extra_plugins={"prep": plugin})
    assert calls == [str(tiny_llama)] and session.model.lmflow_marker == "ready"

    def refuse(config):
        raise LmflowError("the draft is missing", "pass --draft-model")

    broken = types.SimpleNamespace(prepare_inference=hookimpl(refuse))
    with pytest.raises(LmflowError, match="the draft is missing"):
        open_session(str(tiny_llama), extra_plugins={"broken": broken})


def test_hook_prompt_inputs_reach_decode_and_the_core_refuses_images_without_a_plugin(chat_model):
    from lmflow_core import IMAGE_MARKER, open_session

    seen: dict = {}

    def format_conversation(template, conversation, add_generation_prompt, tokenizer):
        seen["images"] = list(conversation.images)
        plain = [
            dataclasses.replace(m, content=m.content.replace(IMAGE_MARKER, "[picture]"), images=())
            for m in conversation.messages
        ]
        flat = dataclasses.replace(conversation, messages=plain)
        return template.render(flat, add_generation_prompt, tokenizer)

    def prompt_inputs(conversation):
        return {"pixel_values": torch.full((1, 2), float(len(conversation.images)))}

    def decode(input_ids, inputs):
        seen["inputs"] = inputs
        return torch.cat([input_ids, input_ids[:, -1:]], dim=1)

    plugin = types.SimpleNamespace(
        format_conversation=hookimpl(format_conversation),
        prompt_inputs=hookimpl(prompt_inputs),
        decode=hookimpl(decode),
    )
    session = open_session(str(chat_model), template="chatml", extra_plugins={"vision": plugin})
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "?"},
    ]
    session.chat([{"role": "user", "content": parts}])
    assert seen["images"] == ["data:image/png;base64,AAAA"]
    assert seen["inputs"]["pixel_values"].tolist() == [[1.0, 1.0]]
    session.chat([{"role": "user", "content": "no picture"}])
    assert seen["inputs"]["pixel_values"].tolist() == [[0.0, 0.0]]

    plain_session = open_session(str(chat_model), template="chatml")
    with pytest.raises(LmflowError, match="--plugins multimodal"):
        plain_session.chat([{"role": "user", "content": parts}])


def test_hook_demo_settings_are_the_lowest_layer_and_conflicts_name_both_plugins():
    from lmflow_core.errors import PluginError
    from lmflow_core.train import configure

    mine = types.SimpleNamespace(demo_settings=hookimpl(lambda given: {"epochs": 2, "learning_rate": 0.5}))
    config, _ = configure(extra_plugins={"mine": mine})
    assert (config.epochs, config.learning_rate, config.template) == (2, 0.5, "chatml")
    config, _ = configure(extra_plugins={"mine": mine}, learning_rate=0.25)
    assert (config.epochs, config.learning_rate) == (2, 0.25)  # the user's setting wins
    other = types.SimpleNamespace(demo_settings=hookimpl(lambda: {"epochs": 3}))
    with pytest.raises(PluginError, match="plugins 'mine' and 'other' set the demo's epochs differently"):
        configure(extra_plugins={"mine": mine, "other": other})
