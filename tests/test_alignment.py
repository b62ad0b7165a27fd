"""Preference pairs (reading, masks, data check) and the reward_model and dpo plugins, on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, invoke, write_json

from lmflow_core import DataError, run
from lmflow_core.data import load_raw_dataset, tokenize_dataset
from lmflow_core.templates import Conversation, encode_segments

COLOURS = ("red", "blue", "green", "yellow", "black", "white")


def colour_pairs(n: int = 24) -> list[dict]:
    """Conversation pairs: a colour answer is preferred to a refusal."""
    return [
        {
            "prompt": [{"role": "user", "content": f"What colour is item {i}?"}],
            "chosen": [{"role": "assistant", "content": f"It is {COLOURS[i % len(COLOURS)]}."}],
            "rejected": [{"role": "assistant", "content": "I do not know."}],
        }
        for i in range(n)
    ]


def text_pairs(n: int = 24) -> list[dict]:
    return [
        {"prompt": f"Item {i} is ", "chosen": f"{COLOURS[i % len(COLOURS)]}.", "rejected": "unknown."}
        for i in range(n)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", colour_pairs())


@pytest.fixture
def text_pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "text_pairs.jsonl", text_pairs())


def tokenizer_of(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# --------------------------------------------------------------------------------------------------------------
# Reading pairs
# --------------------------------------------------------------------------------------------------------------


def read_one(tmp_path: Path, record, name: str = "one.jsonl"):
    raw = load_raw_dataset(write_jsonl(tmp_path / name, [record]))
    return raw.type, raw.records[0]


def test_text_pairs_with_and_without_a_prompt(tmp_path):
    assert read_one(tmp_path, {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green"}) == (
        "paired_text2text",
        {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green"},
    )
    # Anthropic HH: no prompt, the texts' common beginning is the prompt; the space before the answer stays in it
    hh = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello there",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Go away",
    }
    kind, record = read_one(tmp_path, hh)
    assert kind == "paired_text2text"
    assert record == {
        "prompt": "\n\nHuman: Hi\n\nAssistant:",
        "chosen": " Hello there",
        "rejected": " Go away",
    }


def test_pair_layouts_of_hub_datasets_and_mixed_records(tmp_path):
    # UltraFeedback: a text prompt and answers that repeat it as whole conversations
    ultra = {
        "prompt": "Sky?",
        "chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}],
        "messages": None,  # rows read through Arrow carry other columns as None
    }
    kind, record = read_one(tmp_path, ultra, "u.jsonl")
    assert kind == "paired_conversation" and record["messages"] == [{"role": "user", "content": "Sky?"}]
    assert record["chosen"] == [{"role": "assistant", "content": "Blue."}]
    # a system prompt makes a text pair a conversation pair (nothing of the record is dropped)
    kind, record = read_one(
        tmp_path, {"prompt": "Q", "chosen": "A", "rejected": "B", "system": "Be terse."}, "s.jsonl"
    )
    assert kind == "paired_conversation" and record["system"] == "Be terse."
    # texts that part mid-word share the word's beginning, which goes to the answers
    kind, record = read_one(tmp_path, {"chosen": "A: I can help", "rejected": "A: I cannot help"}, "w.jsonl")
    assert record == {"prompt": "A: I", "chosen": " can help", "rejected": " cannot help"}


def test_conversation_pairs_in_every_layout_normalise_alike(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}]
    expected = {
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Sky?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green."}],
    }
    layouts = [
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": "Green."},
        {"messages": prompt, "chosen": "Blue.", "rejected": {"role": "assistant", "content": "Green."}},
        # implicit prompt: two whole conversations sharing their first messages
        {
            "chosen": [*prompt, {"role": "assistant", "content": "Blue."}],
            "rejected": [*prompt, {"role": "assistant", "content": "Green."}],
        },
    ]
    for n, layout in enumerate(layouts):
        assert read_one(tmp_path, layout, f"{n}.jsonl") == ("paired_conversation", expected)
    # the LMFlow types
    lmflow = {
        "type": "paired_conversation",
        "instances": [
            {
                "chosen": {"system": "Be brief.", "messages": expected["messages"] + expected["chosen"]},
                "rejected": {"system": "Be brief.", "messages": expected["messages"] + expected["rejected"]},
            }
        ],
    }
    raw = load_raw_dataset(write_json(tmp_path / "lmflow.json", lmflow))
    assert (raw.type, raw.records[0], dict(raw.formats)) == ("paired_conversation", expected, {"lmflow": 1})
    texts = {"type": "paired_text_to_text", "instances": [{"prompt": "a", "chosen": "b", "rejected": "c"}]}
    assert load_raw_dataset(write_json(tmp_path / "t.json", texts)).type == "paired_text2text"


@pytest.mark.parametrize(
    ("record", "fragments"),
    [
        ({"prompt": "Q", "chosen": "A"}, ['line 1 is a preference pair without "rejected"']),
        ({"chosen": "same text", "rejected": "same text"}, ["are the same text"]),
        ({"prompt": "Q", "chosen": "", "rejected": "B"}, ['"chosen" is empty']),
        (
            {
                "prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                "chosen": "B",
                "rejected": "C",
            },
            ["the prompt ends with an assistant message"],
        ),
        (
            {"prompt": "Q", "chosen": [{"role": "user", "content": "B"}], "rejected": "C"},
            ["(chosen)", "begins with a user message"],
        ),
        (
            {
                "chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A"}],
                "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}],
            },
            ["differ before the assistant's answer"],
        ),
        ({"prompt": "Q", "chosen": 3, "rejected": "C"}, ['"chosen" must be a string, a message or']),
        ({"prompt": "Q", "chosen": "Same.", "rejected": "Same."}, ["are the same answer"]),
        (
            {"prompt": [{"role": "user", "content": "Q"}], "chosen": "A", "rejected": "A"},
            ["are the same answer"],
        ),
        (
            {
                "chosen": [
                    {"role": "system", "content": "S1"},
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                ],
                "rejected": [
                    {"role": "system", "content": "S2"},
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "B"},
                ],
            },
            ["different system prompts"],
        ),
    ],
)
def test_malformed_pairs_are_named_with_file_and_line(tmp_path, record, fragments):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataError) as error:
        load_raw_dataset(path)
    message = str(error.value)
    assert str(path) in message and "line 2" in message
    for fragment in fragments:
        assert fragment.replace("line 1", "line 2") in message, message


# --------------------------------------------------------------------------------------------------------------
# Masks: only the answers are trained
# --------------------------------------------------------------------------------------------------------------


def test_conversation_pair_masks_cover_the_answers_only(tiny_llama, tmp_path):
    from lmflow_core import get_template

    template = get_template("chatml")
    tokenizer = tokenizer_of(tiny_llama)
    record = {
        # a multi-turn prompt: its assistant turn is context, not trained
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Sky?"},
        ],
        "chosen": "Blue.",
        "rejected": "Green, mostly.",
    }
    raw = load_raw_dataset(write_jsonl(tmp_path / "p.jsonl", [record]), template)
    data, stats = tokenize_dataset(raw, tokenizer, 256, template, use_cache=False)
    row = data[0]
    prompt = record["prompt"]
    for side, prefix in (("chosen", ""), ("rejected", "rejected_")):
        whole = Conversation.from_messages([*prompt, {"role": "assistant", "content": record[side]}])
        ids, labels = encode_segments(tokenizer, [template.render(whole, False, tokenizer)], template)
        assert row[f"{prefix}input_ids"] == ids[0]  # the whole conversation, tokenized as training does
        trained = tokenizer.decode([t for t in row[f"{prefix}labels"] if t != -100])
        # the answer and its end of turn, nothing of the prompt
        assert trained == record[side] + "<|im_end|>"
        # as a conversation record the earlier assistant turn would be trained too
        assert tokenizer.decode([t for t in labels[0] if t != -100]).startswith("Hello!")
    assert stats.type == "paired_conversation" and stats.examples == 1


def test_text_pair_masks_and_truncation_counts(tiny_llama, tmp_path):
    tokenizer = tokenizer_of(tiny_llama)
    records = [
        {"prompt": "Item 1 is ", "chosen": "red.", "rejected": "unknown."},
        {"prompt": "Item 2 is ", "chosen": "blue. " * 30, "rejected": "no."},  # too long for 32 tokens
        {"prompt": "x " * 40, "chosen": "a.", "rejected": "b."},  # the prompt alone fills the block
    ]
    raw = load_raw_dataset(write_jsonl(tmp_path / "t.jsonl", records))
    data, stats = tokenize_dataset(raw, tokenizer, 32, use_cache=False)
    prompt_ids = tokenizer("Item 1 is ", add_special_tokens=True)["input_ids"]
    row = data[0]
    assert row["input_ids"][: len(prompt_ids)] == prompt_ids
    assert row["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert row["labels"][len(prompt_ids) :] == tokenizer("red.", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    assert row["rejected_attention_mask"] == [1] * len(row["rejected_input_ids"])
    # pair 2 is cut to the block size and kept; pair 3 has no answer token left and is dropped, counted
    assert (stats.truncated, stats.dropped_untrained, stats.examples) == (2, 1, 2)
    assert len(data[1]["input_ids"]) == 32


def test_data_check_reports_pairs_and_truncation(runner, tiny_llama, pairs_file):
    result = invoke(runner, "data", "check", pairs_file, "--model", tiny_llama, "--block-size", "28")
    assert result.exit_code == 0, result.output
    assert "paired_conversation" in result.output and 'preference ("chosen", "rejected")' in result.output
    assert "pairs: 24 (each a prompt with a chosen and a rejected answer)" in result.output
    assert "tokens per pair (tokenizer" in result.output and "prompt and the longer answer" in result.output
    assert "block size 28: 24 pairs would be truncated, 0 would have no trained token left" in result.output


def test_pairs_need_a_pairwise_loss_and_the_plugins_need_pairs(
    runner, tiny_llama, pairs_file, chat_data, tmp_path
):
    result = invoke(
        runner, "run", "--model", tiny_llama, "--dataset", pairs_file, "--template", "chatml",
        "--output-dir", tmp_path / "a",
    )  # fmt: skip
    assert_one_line_error(result, "preference pairs", "--plugins dpo")
    for plugin in ("dpo", "reward_model"):
        result = invoke(
            runner, "run", "--plugins", plugin, "--model", tiny_llama, "--dataset", chat_data,
            "--template", "chatml", "--output-dir", tmp_path / plugin, "--max-steps", "1",
        )  # fmt: skip
        assert_one_line_error(result, f"--plugins {plugin} trains on preference pairs")
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------------------


def dpo_run(model, data, out, **settings):
    options = {
        "model": str(model),
        "dataset": str(data),
        "output_dir": str(out),
        "plugins": ["dpo", *settings.pop("more_plugins", [])],
        "max_steps": 6,
        "batch_size": 4,
        "learning_rate": 2e-3,
        "logging_steps": 1,
        "save_steps": None,
        "template": "chatml",
        **settings,
    }
    return run(**options)


def test_dpo_starts_at_ln2_and_its_margins_and_accuracy_grow(tiny_llama, pairs_file, tmp_path):
    from transformers import TrainerCallback

    history = []

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                history.append(dict(logs))

    from lmflow_core import hookimpl

    plugin = type("P", (), {"trainer_callbacks": staticmethod(hookimpl(lambda: [Logs()]))})
    result = dpo_run(
        tiny_llama, pairs_file, tmp_path / "o", eval_dataset=str(pairs_file), extra_plugins={"logs": plugin}
    )
    losses = [loss for _, loss in result.losses]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 1
    assert losses[-1] < losses[0] - 0.05
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["rewards/margins"] > history[1]["rewards/margins"] > 0
    assert history[-1]["rewards/accuracies"] == 1.0
    assert result.eval_metrics["dpo_pair_accuracy"] == 1.0 and result.eval_metrics["dpo_margin"] > 0
    record = json.loads((tmp_path / "o" / "lmflow_run.json").read_text())
    assert record["result"]["eval"]["dpo_pair_accuracy"] == 1.0


@pytest.mark.parametrize(("loss", "beta", "first"), [("ipo", 0.25, 1 / (4 * 0.25**2)), ("hinge", 0.5, 1.0)])
def test_dpo_ipo_and_hinge_losses_at_the_first_step(tiny_llama, text_pairs_file, tmp_path, loss, beta, first):
    result = dpo_run(
        tiny_llama, text_pairs_file, tmp_path / loss, max_steps=3, dpo={"loss": loss, "beta": beta}
    )
    losses = [value for _, value in result.losses]
    assert losses[0] == pytest.approx(first, rel=1e-6)  # z = 0 when policy = reference
    assert losses[-1] < losses[0]


def test_dpo_precomputed_reference_trains_as_a_reference_copy(tiny_llama, text_pairs_file, tmp_path):
    copy = dpo_run(tiny_llama, text_pairs_file, tmp_path / "copy", max_steps=4)
    pre = dpo_run(tiny_llama, text_pairs_file, tmp_path / "pre", max_steps=4, dpo={"precompute_ref": True})
    assert [loss for _, loss in pre.losses] == pytest.approx([loss for _, loss in copy.losses], abs=1e-5)


def test_dpo_under_lora_uses_the_adapter_disabled_base_as_reference(tiny_llama, pairs_file, tmp_path):
    """After training, the reference the loss sees is still the base model exactly, and no copy was made."""
    from lmflow_plugins.alignment import dpo
    from lmflow_plugins.alignment.pairs import answer_logps
    from transformers import AutoModelForCausalLM, TrainerCallback

    checks = []

    class Check(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            batch = next(iter(train_dataloader))
            config = self.config
            with torch.no_grad():
                reference, _ = dpo._reference(config, model, batch, "train")
                policy, _ = answer_logps(
                    model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch["labels"]
                )
                base = AutoModelForCausalLM.from_pretrained(tiny_llama)
                expected, _ = answer_logps(
                    base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                    batch["labels"],
                )
            checks.append((config.stash[dpo.STATE], reference, policy, expected))

    check = Check()
    from lmflow_core import hookimpl

    def trainer_callbacks(config):
        check.config = config
        return [check]

    plugin = type("P", (), {"trainer_callbacks": staticmethod(hookimpl(trainer_callbacks))})
    dpo_run(
        tiny_llama, pairs_file, tmp_path / "o", more_plugins=["lora"], learning_rate=1e-2,
        extra_plugins={"check": plugin},
    )  # fmt: skip
    state, reference, policy, expected = checks[0]
    assert state.adapter_reference and state.reference is None and not state.precomputed
    assert torch.allclose(reference, expected, atol=1e-5)  # the reference is the base model
    assert not torch.allclose(policy, expected, atol=1e-3)  # while the policy has moved away from it


def test_dpo_resume_is_bit_identical(tiny_llama, text_pairs_file, tmp_path):
    from helpers import stopped_run
    from safetensors.torch import load_file

    whole = dpo_run(tiny_llama, text_pairs_file, tmp_path / "whole", max_steps=4, save_steps=2)
    stopped = stopped_run(tmp_path / "whole", "checkpoint-2", tmp_path / "resumed")
    resumed = dpo_run(tiny_llama, text_pairs_file, stopped, max_steps=4, save_steps=2, resume=True)
    assert resumed.losses == whole.losses
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_under_bf16_starts_at_ln2(tiny_llama, text_pairs_file, tmp_path):
    """The reference runs in the policy's autocast: at step 1 they are equal, in bf16 as in fp32."""
    for precompute in (False, True):
        result = dpo_run(
            tiny_llama, text_pairs_file, tmp_path / f"bf16-{precompute}", max_steps=1, bf16=True,
            dpo={"precompute_ref": precompute},
        )  # fmt: skip
        assert result.losses[0][1] == pytest.approx(math.log(2), abs=1e-6)


def test_alignment_plugins_refuse_what_they_cannot_combine_with(
    runner, tiny_llama, text_pairs_file, tmp_path
):
    for plugins, fragments in (
        ("dpo,chunked_ce", ["chunked_ce", "logits"]),
        ("reward_model,lora", ["score head untrained"]),
        ("reward_model,chunked_ce", ["chunked_ce"]),
        ("dpo,reward_model", ["one after the other"]),
    ):
        result = invoke(
            runner, "run", "--plugins", plugins, "--model", tiny_llama, "--dataset", text_pairs_file,
            "--output-dir", tmp_path / "o",
        )  # fmt: skip
        assert_one_line_error(result, *fragments)
    assert not (tmp_path / "o").exists()


def test_dpo_options_are_checked(runner, tiny_llama, text_pairs_file, tmp_path):
    result = invoke(
        runner, "run", "--plugins", "dpo", "--model", tiny_llama, "--dataset", text_pairs_file,
        "--dpo-beta", "0", "--output-dir", tmp_path / "o",
    )  # fmt: skip
    assert_one_line_error(result, "--dpo-beta")
    result = invoke(
        runner, "run", "--plugins", "dpo", "--model", tiny_llama, "--dataset", text_pairs_file,
        "--dpo-loss", "kto", "--output-dir", tmp_path / "o",
    )  # fmt: skip
    assert result.exit_code != 0 and "kto" in result.output + result.stderr


# --------------------------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------------------------


def test_reward_model_learns_the_preference_and_loads_as_sequence_classification(
    runner, tiny_llama, pairs_file, tmp_path
):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    result = invoke(
        runner, "run", "--plugins", "reward_model", "--model", tiny_llama, "--dataset", pairs_file,
        "--eval-dataset", pairs_file, "--template", "chatml", "--output-dir", out, "--max-steps", "12",
        "--batch-size", "4", "--learning-rate", "3e-3", "--logging-steps", "4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "pair_accuracy 1.0000" in result.output
    assert "loads with AutoModelForSequenceClassification" in result.output
    record = json.loads((out / "lmflow_run.json").read_text())
    losses = [loss for _, loss in record["result"]["losses"]]
    assert losses[-1] < losses[0] / 2
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    # the saved model scores every chosen answer above its rejected one
    from lmflow_core import get_template

    template, tokenizer = get_template("chatml"), tokenizer_of(out)
    raw = load_raw_dataset(pairs_file, template)
    data, _ = tokenize_dataset(raw, tokenizer, 256, template, use_cache=False)
    with torch.no_grad():
        for row in data.select(range(4)):
            chosen = model(input_ids=torch.tensor([row["input_ids"]])).logits.item()
            rejected = model(input_ids=torch.tensor([row["rejected_input_ids"]])).logits.item()
            assert chosen > rejected


@pytest.mark.parametrize(
    ("loss", "beta", "more"),
    [("sigmoid", 0.1, {}), ("ipo", 0.5, {"precompute_ref": True}), ("hinge", 0.2, {"grad_accum": 2})],
)
def test_dpo_losses_equal_trl_dpo_trainer(tiny_llama, tmp_path, loss, beta, more):
    """Per-step losses equal TRL's DPOTrainer on the same tiny model, data and training settings (1e-4)."""
    pytest.importorskip("trl")
    from helpers import trl_dpo_losses

    # Prompts end where a token ends (a word, then the answer's leading space): TRL tokenizes prompt and answer
    # in one piece, lmflow apart (as the model sees them at inference); on such text the ids are the same.
    records = [
        {"prompt": f"Item {i} is", "chosen": f" {COLOURS[i % len(COLOURS)]}.", "rejected": " unknown."}
        for i in range(16)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    grad_accum = more.get("grad_accum", 1)
    settings = {"steps": 5, "batch_size": 2, "learning_rate": 5e-3, "seed": 7}
    expected = trl_dpo_losses(
        tiny_llama, records, beta=beta, loss_type=loss, precompute_ref=more.get("precompute_ref", False),
        output_dir=tmp_path / "trl", grad_accum=grad_accum, **settings,
    )  # fmt: skip
    result = dpo_run(
        tiny_llama, data, tmp_path / "lmflow", max_steps=settings["steps"], batch_size=2, grad_accum=grad_accum,
        learning_rate=settings["learning_rate"], seed=7, template=None,
        dpo={"beta": beta, "loss": loss, "precompute_ref": more.get("precompute_ref", False)},
    )  # fmt: skip
    losses = [value for _, value in result.losses]
    assert len(losses) == len(expected) == 5
    assert losses == pytest.approx(expected, abs=1e-4)
    assert losses[-1] != pytest.approx(losses[0], abs=1e-3)  # the comparison spans real training


def test_the_alignment_example_data_and_reward(tmp_path):
    """examples/alignment: the pairs load as conversation pairs, no evaluation question is trained on, and the
    rule-based reward scores the demo's own answer 1 and a wrong one lower."""
    import runpy

    from helpers import REPO

    runpy.run_path(str(REPO / "examples" / "alignment" / "make_data.py"), run_name="make_data")["main"](
        str(tmp_path)
    )
    train = load_raw_dataset(tmp_path / "pairs.jsonl")
    evaluation = load_raw_dataset(tmp_path / "pairs_eval.jsonl")
    assert (
        train.type == evaluation.type == "paired_conversation" and len(evaluation) == 48 and len(train) > 200
    )
    asked = {r["messages"][-1]["content"] for r in train.records}
    assert not asked & {r["messages"][-1]["content"] for r in evaluation.records}
    reward = runpy.run_path(str(REPO / "examples" / "alignment" / "reward.py"))["reward"]
    pair = evaluation.records[0]
    prompt = [{"role": "user", "content": pair["messages"][-1]["content"]}]
    good, bad = reward([prompt, prompt], [pair["chosen"][0]["content"], pair["rejected"][0]["content"]])
    assert good == 1.0 and bad < 0.9
