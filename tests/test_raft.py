"""The raft plugin: `lmflow raft` and ``raft()``, reward-ranked fine-tuning on a tiny Llama.

A rule-based reward (the share of an answer's characters that are digits) is learned by the randomly
initialised tiny Llama: its mean reward more than doubles within three iterations, and the kept answers never
score below their batch. A run stopped after iteration 1 and resumed ends as an uninterrupted run; a reward model
directory scores exactly as a direct forward pass of its ``*ForSequenceClassification`` on the ids training
encodes; every mistake is one line, and a directory that is not a RAFT run is never touched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lmflow_plugins.alignment.raft as raft_plugin
import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error, invoke, plugin_commands, write_json
from lmflow_plugins.alignment.raft import SUMMARY, prepare_output, raft, select_kept
from lmflow_plugins.alignment.raft_inputs import read_prompts
from lmflow_plugins.alignment.scoring import RewardModel

REWARDS_PY = '''
import math


def digits(prompts, answers):
    """The share of an answer's characters that are digits."""
    return [sum(c.isdigit() for c in answer) / max(1, len(answer)) for answer in answers]


def too_few(prompts, answers):
    return [1.0] * (len(answers) - 1)


def words(prompts, answers):
    return ["good" for _ in answers]


def not_a_number(prompts, answers):
    return [math.nan for _ in answers]


LIMIT = 3
'''

PROMPTS = [
    "Say something.",
    "Tell me a number.",
    "What is new?",
    "Hello!",
    "Count for me.",
    "Give me a word.",
    "How are you?",
    "Write a line.",
]
# Sampling and training of the learning run: 8 prompts x 4 answers of up to 8 tokens, 4 epochs at lr 1e-2.
LEARNING = [
    "--samples-per-prompt",
    4,
    "--max-new-tokens",
    8,
    "--template",
    "chatml",
    "--learning-rate",
    1e-2,
    "--epochs",
    4,
    "--batch-size",
    8,
    "--device",
    "cpu",
]


@pytest.fixture(scope="module", autouse=True)
def raft_command():
    """`lmflow raft` in the CLI that ``invoke`` runs."""
    yield from plugin_commands(raft_plugin, "raft")


@pytest.fixture(scope="module", autouse=True)
def one_thread(tmp_path_factory):
    """One torch thread (a 2-layer model decodes 5x faster on a busy 2-core machine than with two), and the
    module's own tokenization cache (the conftest's is per test, and module fixtures come first)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMFLOW_CACHE", str(tmp_path_factory.mktemp("raft-cache")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """``(prompts.jsonl, rewards.py)``."""
    tmp = tmp_path_factory.mktemp("raft-inputs")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    rewards = tmp / "rewards.py"
    rewards.write_text(REWARDS_PY, encoding="utf-8")
    return prompts, rewards


def digits(answer: str) -> float:
    return sum(c.isdigit() for c in answer) / max(1, len(answer))


def rows(out: Path, iteration: int, name: str = "rewards.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / f"iteration-{iteration}" / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def learned(tiny_llama, inputs, tmp_path_factory) -> tuple[Path, str]:
    """Three RAFT iterations of the tiny Llama on the digit reward by `lmflow raft`: interrupted (Ctrl-C) while
    training iteration 2, left as a killed process would leave it (a half-written staging directory), and
    resumed: ``(output, resumed run's output)``."""
    prompts, rewards = inputs
    out = tmp_path_factory.mktemp("raft-learned") / "out"
    common = ["raft", "--model", tiny_llama, "--prompts", prompts, "--reward", f"{rewards}:digits"]
    train = raft_plugin.train_on_kept

    def interrupted(model, staging, *args, **kwargs):
        if staging.name.startswith(".staging-iteration-2-"):
            raise KeyboardInterrupt
        return train(model, staging, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(raft_plugin, "train_on_kept", interrupted)
        first = invoke(CliRunner(), *common, "--output", out, "--iterations", 3, *LEARNING)
    assert first.exit_code == 130, first.output
    assert sorted(p.name for p in out.iterdir()) == ["iteration-1", SUMMARY]
    assert json.loads((out / SUMMARY).read_text())["status"] == "running"
    killed = out / ".staging-iteration-2-killed"
    (killed / "model").mkdir(parents=True)
    (killed / "rewards.jsonl").write_text('{"half": ')
    resumed = invoke(CliRunner(), *common, "--output", out, "--iterations", 3, "--resume", *LEARNING)
    assert resumed.exit_code == 0, resumed.output
    assert not killed.exists()
    return out, resumed.output


def test_the_mean_reward_more_than_doubles_and_the_kept_answers_never_score_below_their_batch(
    learned, tiny_llama
):
    out, output = learned
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["status"] == "completed" and len(summary["iterations"]) == 3
    means = summary["mean_reward"]
    # Measured: 0.0605 -> 0.132 -> 0.210 (the models of iterations 0, 1 and 2 answering).
    assert means[2] > 2 * means[0] and means[1] > means[0], means
    assert f"mean reward per iteration: {', '.join(f'{m:.4g}' for m in means)}" in output
    for n, record in enumerate(summary["iterations"], 1):
        samples = rows(out, n)
        assert len(samples) == len(PROMPTS) * 4 == record["samples"]
        rewards = [s["reward"] for s in samples]
        assert rewards == [digits(s["answer"]) for s in samples]  # the function's values, as returned
        kept = [s for s in samples if s["kept"]]
        assert math.isclose(record["mean_reward"], sum(rewards) / len(rewards))
        assert math.isclose(record["mean_kept_reward"], sum(s["reward"] for s in kept) / len(kept))
        assert record["mean_kept_reward"] >= record["mean_reward"]
        # per-prompt: exactly the first best answer of each prompt, trained as the assistant's reply
        for p, prompt in enumerate(PROMPTS):
            group = [s for s in samples if s["prompt_index"] == p]
            assert [s["prompt"] for s in group] == [prompt] * 4
            best = max(group, key=lambda s: (s["reward"], -s["sample"]))
            assert [s["kept"] for s in group] == [s is best for s in group]
        assert rows(out, n, "train.jsonl") == [
            {
                "messages": [
                    {"role": "user", "content": s["prompt"]},
                    {"role": "assistant", "content": s["answer"]},
                ]
            }
            for s in kept
        ]
        model = out / f"iteration-{n}" / "model"
        assert (model / "model.safetensors").is_file()
        assert json.loads((model / "lmflow_run.json").read_text())["template"] == "chatml"
        assert record["model_sampled"] == str(out / f"iteration-{n - 1}" / "model" if n > 1 else tiny_llama)
    assert summary["model"] == str(out / "iteration-3" / "model")


def test_a_run_stopped_after_iteration_1_resumes_at_2_and_ends_as_an_uninterrupted_run(
    learned, tiny_llama, inputs, tmp_path
):
    from safetensors.torch import load_file

    out, output = learned
    assert "resuming" in output and "1 of 3 iterations finished" in output
    assert "iteration 1/3" not in output and "iteration 2/3: sampling" in output
    prompts, rewards = inputs
    whole = raft(
        tiny_llama,
        prompts,
        f"{rewards}:digits",
        tmp_path / "whole",
        iterations=2,
        samples_per_prompt=4,
        max_new_tokens=8,
        template="chatml",
        learning_rate=1e-2,
        epochs=4,
        batch_size=8,
        device="cpu",
        log=None,
    )
    assert whole.resumed_from == 0 and whole.model == tmp_path / "whole" / "iteration-2" / "model"
    for n in (1, 2):
        assert rows(tmp_path / "whole", n) == rows(out, n)
    ours = load_file(out / "iteration-2" / "model" / "model.safetensors")
    theirs = load_file(whole.model / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)


def test_resume_refuses_other_settings_and_does_nothing_when_finished(learned, tiny_llama, inputs):
    out, _ = learned
    prompts, rewards = inputs
    common = ["raft", "--model", tiny_llama, "--prompts", prompts, "--reward", f"{rewards}:digits"]
    before = (out / SUMMARY).read_text()
    changed = [*LEARNING[:-2], "--temperature", 0.7, "--device", "cpu"]
    result = invoke(CliRunner(), *common, "--output", out, "--iterations", 3, "--resume", *changed)
    assert_one_line_error(result, "--resume", "other settings", "temperature 1.0 there, 0.7 now")
    again = invoke(CliRunner(), *common, "--output", out, "--iterations", 3, "--resume", *LEARNING)
    assert again.exit_code == 0 and "sampling" not in again.output
    assert json.loads((out / SUMMARY).read_text())["iterations"] == json.loads(before)["iterations"]
    not_resumed = invoke(CliRunner(), *common, "--output", out, "--iterations", 3, *LEARNING)
    assert_one_line_error(not_resumed, "already holds a RAFT run (3 iterations finished)", "--resume")


# --------------------------------------------------------------------------------------------------------------
# A reward model directory as the reward
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    """A seeded tiny LlamaForSequenceClassification (one label) with the demo tokenizer, stored with the
    template it was "trained" with: alpaca, another than the policy's."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from lmflow_core.demo import demo_model_dir

    out = tmp_path_factory.mktemp("reward-model")
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # scores of order 1, not 0.02
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / "lmflow_run.json", {"status": "completed", "template": "alpaca"})
    return out


def direct_score(directory: Path, messages: list[dict]) -> float:
    """A forward pass of AutoModelForSequenceClassification on the ids training encodes, one conversation."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmflow_core import Conversation, encode_segments, get_template

    tokenizer = AutoTokenizer.from_pretrained(directory)
    template = get_template("alpaca")
    segments = template.render(Conversation.from_messages(messages), False, tokenizer)
    (ids,), _ = encode_segments(tokenizer, [segments], template)
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        return float(model(torch.tensor([ids])).logits[0, 0])


def conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def test_reward_model_scores_equal_a_direct_forward_pass_on_the_training_encoding(reward_model_dir):
    scorer = RewardModel.load(reward_model_dir, template="chatml", device="cpu")
    assert scorer.template_name == "alpaca"  # the one stored with the reward model wins over the policy's
    batch = [
        conversation("Hi!", "Hello."),
        conversation("What is 2 plus 2?", "2 plus 2 is 4, which is a longer answer than the others."),
        [{"role": "system", "content": "Be brief."}, *conversation("Name a colour.", "Green.")],
    ]
    scores = scorer.score(batch, batch_size=3)  # right-padded together
    expected = [direct_score(reward_model_dir, messages) for messages in batch]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 3) for s in scores)) == 3 and max(abs(s) for s in scores) > 0.05


def test_a_reward_model_trained_by_lmflow_scores_as_its_training_encoded_the_pairs(tiny_llama, tmp_path):
    """The reward_model plugin's output, scored by RewardModel, equals the model's forward pass on the ids the
    run trained on (the core's tokenization of the preference pairs)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmflow_core import get_template, run
    from lmflow_core.data import load_raw_dataset, tokenize_dataset

    records = [
        {
            "prompt": [{"role": "user", "content": f"What colour is item {i}?"}],
            "chosen": [{"role": "assistant", "content": f"It is {('red', 'blue', 'green')[i % 3]}."}],
            "rejected": [{"role": "assistant", "content": "I do not know."}],
        }
        for i in range(6)
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "rm"
    run(
        plugins=["reward_model"],
        model=str(tiny_llama),
        dataset=str(pairs),
        template="chatml",
        output_dir=str(out),
        max_steps=2,
        batch_size=4,
        learning_rate=3e-3,
        save_steps=0,
    )
    scorer = RewardModel.load(out, device="cpu")  # the template stored with it: chatml
    scores = scorer.score(
        [r["prompt"] + r["chosen"] for r in records] + [r["prompt"] + r["rejected"] for r in records]
    )
    template = get_template("chatml")
    data, _ = tokenize_dataset(
        load_raw_dataset(str(pairs), template),
        AutoTokenizer.from_pretrained(out),
        256,
        template,
        use_cache=False,
    )
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        expected = [
            model(input_ids=torch.tensor([row[column]])).logits.item()
            for column in ("input_ids", "rejected_input_ids")
            for row in data
        ]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_a_reward_model_directory_is_a_reward(reward_model_dir, tiny_llama, inputs, tmp_path):
    prompts = write_json(tmp_path / "prompts.json", [{"prompt": p} for p in PROMPTS[:3]])
    out = tmp_path / "out"
    result = invoke(
        CliRunner(),
        "raft",
        "--model",
        tiny_llama,
        "--prompts",
        prompts,
        "--reward",
        reward_model_dir,
        "--output",
        out,
        "--iterations",
        1,
        "-k",
        2,
        "--strategy",
        "global",
        "--top-fraction",
        0.5,
        "--max-new-tokens",
        6,
        "--template",
        "chatml",
        "--learning-rate",
        1e-3,
        "--max-steps",
        1,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    samples = rows(out, 1)
    scorer = RewardModel.load(reward_model_dir, device="cpu")
    expected = scorer.score([conversation(s["prompt"], s["answer"]) for s in samples])
    assert [s["reward"] for s in samples] == pytest.approx(expected, abs=1e-5)
    kept = [s["reward"] for s in samples if s["kept"]]
    assert len(kept) == 3 and sorted(kept) == sorted(s["reward"] for s in samples)[3:]
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["settings"]["reward"] == str(reward_model_dir.resolve())
    assert summary["mean_kept_reward"][0] >= summary["mean_reward"][0]


def test_a_train_config_is_passed_on_and_a_lora_adapter_is_merged_for_the_next_iteration(
    tiny_llama, inputs, tmp_path
):
    _, rewards = inputs
    train_config = tmp_path / "train.yaml"
    train_config.write_text("plugins: [lora]\nlora:\n  rank: 2\nmax_steps: 1\nlearning_rate: 1.0e-3\n")
    result = raft(
        tiny_llama,
        write_json(tmp_path / "prompts.json", [{"prompt": "Hi"}]),
        f"{rewards}:digits",
        tmp_path / "out",
        iterations=1,
        samples_per_prompt=2,
        max_new_tokens=4,
        template="chatml",
        train_config=train_config,
        device="cpu",
        log=None,
    )
    assert result.iterations[0]["train"]["global_step"] == 1
    adapter = tmp_path / "out" / "iteration-1" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2
    assert (result.model / "model.safetensors").is_file() and not (
        result.model / "adapter_config.json"
    ).exists()
    assert json.loads((result.model / "lmflow_run.json").read_text())["template"] == "chatml"


# --------------------------------------------------------------------------------------------------------------
# Keeping the best, reading prompts
# --------------------------------------------------------------------------------------------------------------


def test_select_kept_per_prompt_and_global():
    rewards = [0.1, 0.5, 0.5, 0.2, 0.0, 0.9]
    assert select_kept(rewards, 3, "per-prompt", 1.0) == [False, True, False, False, False, True]
    assert select_kept(rewards, 3, "global", 0.5) == [False, True, True, False, False, True]
    assert select_kept(rewards, 3, "global", 0.01) == [False, False, False, False, False, True]
    assert select_kept(rewards, 3, "global", 1.0) == [True] * 6


def test_prompt_records_of_both_kinds(tmp_path):
    path = write_json(
        tmp_path / "p.json",
        [
            {"prompt": "Hi", "system": "Be brief."},
            {
                "messages": [
                    {"role": "user", "content": "A"},
                    {"role": "assistant", "content": "B"},
                    {"role": "user", "content": "C"},
                ]
            },
        ],
    )
    prompts = read_prompts(path)
    assert prompts.conversations[0] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert [m["content"] for m in prompts.conversations[1]] == ["A", "B", "C"] and prompts.text(1) == "C"


# --------------------------------------------------------------------------------------------------------------
# Mistakes: one line each, before any model loads where they can be known then
# --------------------------------------------------------------------------------------------------------------


def raft_args(model, prompts, reward, out, *extra) -> list:
    return ["raft", "--model", model, "--prompts", prompts, "--reward", reward, "--output", out, *extra]


@pytest.mark.parametrize(
    "records, suffix, fragments",
    [
        (None, ".jsonl", ["--prompts file", "does not exist"]),
        (
            '{"prompt": "ok"}\n{"text": "no prompt"}\n',
            ".jsonl",
            ["line 2", 'exactly one of "prompt" and "messages"'],
        ),
        ('{"prompt": "ok"}\n{"prompt": \n', ".jsonl", ["line 2 is not valid JSON"]),
        (
            json.dumps([{"prompt": "ok"}, {"messages": [{"role": "assistant", "content": "x"}]}]),
            ".json",
            ["record 1", "message 0 is from 'assistant'"],
        ),
        (
            json.dumps(
                [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
            ),
            ".json",
            ["record 0", "last message is from 'assistant'"],
        ),
        (json.dumps({"prompt": "x"}), ".json", ["not a list of records"]),
        ("prompt: x", ".txt", ["neither .json nor .jsonl"]),
    ],
)
def test_a_bad_prompts_file_names_the_file_and_record(
    records, suffix, fragments, tiny_llama, inputs, tmp_path
):
    _, rewards = inputs
    prompts = tmp_path / f"prompts{suffix}"
    if records is not None:
        prompts.write_text(records)
    result = invoke(CliRunner(), *raft_args(tiny_llama, prompts, f"{rewards}:digits", tmp_path / "out"))
    assert_one_line_error(result, str(prompts), *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "reward, fragments",
    [
        ("no_such_module_xyz:score", ["there is no module 'no_such_module_xyz'"]),
        ("json:no_such_function", ["json has no function 'no_such_function'", "dumps"]),
        ("{rewards}:missing", ["has no function 'missing'", "digits"]),
        ("{rewards}:LIMIT", ["'LIMIT'", "is not a function"]),
        ("missing_file.py:score", ["file missing_file.py does not exist"]),
        ("no_such_dir", ["neither a directory nor a function"]),
        ("{tmp}", ["holds no model (config.json is missing"]),
    ],
)
def test_a_bad_reward_is_one_line_before_anything_loads(
    reward, fragments, tiny_llama, inputs, tmp_path, model_loads
):
    prompts, rewards = inputs
    reward = reward.format(rewards=rewards, tmp=tmp_path)
    result = invoke(CliRunner(), *raft_args(tiny_llama, prompts, reward, tmp_path / "out"))
    assert_one_line_error(result, f"--reward {reward}", *fragments)
    assert model_loads == []


def test_a_reward_model_with_several_labels_is_refused(tiny_llama, inputs, tmp_path):
    prompts, _ = inputs
    write_json(
        tmp_path / "config.json",
        {"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "a", "1": "b"}},
    )
    result = invoke(CliRunner(), *raft_args(tiny_llama, prompts, tmp_path, tmp_path / "out"))
    assert_one_line_error(result, "classifier with 2 labels", "num_labels=1")


@pytest.mark.parametrize(
    "function, fragments",
    [
        ("too_few", ["returned 0 values for 1 answers"]),
        ("words", ["returned str 'good' for sample 0 of prompt 0"]),
        ("not_a_number", ["returned nan for sample 0 of prompt 0", "finite"]),
    ],
)
def test_a_reward_function_must_return_one_finite_float_per_answer(
    function, fragments, tiny_llama, inputs, tmp_path
):
    _, rewards = inputs
    prompts = write_json(tmp_path / "prompts.json", [{"prompt": "Hi"}])
    out = tmp_path / "out"
    extra = ["--iterations", 1, "-k", 1, "--max-new-tokens", 2, "--template", "chatml", "--device", "cpu"]
    result = invoke(CliRunner(), *raft_args(tiny_llama, prompts, f"{rewards}:{function}", out, *extra))
    assert_one_line_error(result, f"reward {rewards.resolve()}:{function}", *fragments)
    # The iteration was not finished: nothing of it is left, and the run says so.
    assert sorted(p.name for p in out.iterdir()) == [SUMMARY]
    assert json.loads((out / SUMMARY).read_text())["status"] == "running"


def test_a_prompt_that_does_not_fit_the_template_names_the_file_and_prompt(tiny_llama, inputs, tmp_path):
    _, rewards = inputs
    prompts = write_json(
        tmp_path / "prompts.json", [{"prompt": "Hi"}, {"prompt": "Hi", "system": "Be brief."}]
    )
    extra = ["-k", 1, "--max-new-tokens", 1, "--template", "gemma", "--device", "cpu"]
    result = invoke(
        CliRunner(), *raft_args(tiny_llama, prompts, f"{rewards}:digits", tmp_path / "out", *extra)
    )
    assert_one_line_error(
        result, f"{prompts}: prompt 1 does not fit the template 'gemma'", "no system prompt"
    )


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--top-fraction", 0], ["--top-fraction must be in (0, 1], got 0"]),
        (["--top-fraction", 1.5], ["--top-fraction must be in (0, 1], got 1.5"]),
        (
            ["--iterations", 0, "-k", 0],
            ["2 problems", "--iterations must be at least 1", "--samples-per-prompt"],
        ),
        (["--plugins", "lroa"], ["unknown plugin 'lroa' (did you mean 'lora'?)"]),
        (["--learning-rate", -1], ["--learning-rate must be greater than 0, got -1.0"]),
        (["--template", "chatmll"], ["chatmll"]),
        (["--resume", "--overwrite"], ["contradict"]),
    ],
)
def test_bad_settings_are_one_line_before_any_model_loads(
    extra, fragments, tiny_llama, inputs, tmp_path, model_loads
):
    prompts, rewards = inputs
    result = invoke(
        CliRunner(), *raft_args(tiny_llama, prompts, f"{rewards}:digits", tmp_path / "out", *extra)
    )
    assert "raft_preflight" not in assert_one_line_error(result, *fragments)
    assert model_loads == [] and not (tmp_path / "out").exists()


def test_a_lora_adapter_as_the_model_is_refused(inputs, tmp_path):
    prompts, rewards = inputs
    write_json(tmp_path / "adapter_config.json", {"peft_type": "LORA"})
    result = invoke(CliRunner(), *raft_args(tmp_path, prompts, f"{rewards}:digits", tmp_path / "out"))
    assert_one_line_error(result, f"--model {tmp_path} is a LoRA adapter", "lmflow merge-lora")


def test_an_output_directory_that_is_not_a_raft_run_is_refused_and_left_alone(tiny_llama, inputs, tmp_path):
    prompts, rewards = inputs
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    for flags in ([], ["--overwrite"], ["--resume"]):
        result = invoke(CliRunner(), *raft_args(tiny_llama, prompts, f"{rewards}:digits", out, *flags))
        assert_one_line_error(
            result, f"--output {out} is not empty and holds no RAFT run", "nothing was changed"
        )
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    inside = invoke(CliRunner(), *raft_args(tiny_llama, prompts, f"{rewards}:digits", prompts.parent))
    assert_one_line_error(inside, "is or contains the input")


def test_overwrite_removes_only_what_raft_wrote(tmp_path):
    out = tmp_path / "out"
    (out / "iteration-1" / "model").mkdir(parents=True)
    (out / ".staging-iteration-2-x").mkdir()
    write_json(out / SUMMARY, {"command": "raft", "settings": {}, "iterations": []})
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match=r"holds files RAFT did not write \(keep.txt\); nothing was deleted"):
        prepare_output(out, {}, resume=False, overwrite=True, say=print)
    assert sorted(p.name for p in out.iterdir()) == [
        ".staging-iteration-2-x",
        "iteration-1",
        "keep.txt",
        SUMMARY,
    ]
    (out / "keep.txt").unlink()
    assert prepare_output(out, {}, resume=False, overwrite=True, say=print) == []
    assert list(out.iterdir()) == []
