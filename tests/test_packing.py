"""--packing: rows of several examples compute exactly what the examples compute alone (loss and logits), the
architectures that cannot keep packed examples apart are refused before any model loads, and `lmflow run
--packing` trains end to end with the packed-mask path of transformers actually taken."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from helpers import invoke, tiny_model, write_json
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, masking_utils

from lmflow_core.data.packing import (
    PackedCollator,
    check_packing_support,
    pack_dataset,
    pack_examples,
    packing_problem,
    plan_rows,
)
from lmflow_core.errors import ConfigError

BLOCK = 24
LENGTHS = (13, 7, 5, 11, 2, 9, 4, 16, 3)
TOLERANCE = 1e-5

# Tiny in-memory models of architectures the shared fixtures do not cover.
COMMON = {
    "vocab_size": 128,
    "num_hidden_layers": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SHAPES = {
    "qwen2": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
    "mistral": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "phi3": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
    "gemma": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
    },
    "bloom": {"hidden_size": 32, "n_head": 4},
}


@pytest.fixture(scope="module")
def tokenizer():
    from lmflow_core.demo import demo_model_dir

    return AutoTokenizer.from_pretrained(demo_model_dir())


def examples(vocab: int, seed: int = 0) -> dict[str, list[list[int]]]:
    """Token sequences of varied lengths; the first third of each is a prompt (labels -100), as in chat data."""
    rng = random.Random(seed)
    ids = [[rng.randrange(3, vocab) for _ in range(n)] for n in LENGTHS]
    labels = [[-100] * (len(x) // 3) + x[len(x) // 3 :] for x in ids]
    return {"input_ids": ids, "labels": labels, "attention_mask": [[1] * len(x) for x in ids]}


def padded_batch(data: dict[str, list[list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """The unpacked reference: every example in one right-padded batch with an attention mask."""
    longest = max(len(x) for x in data["input_ids"])

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([r + [value] * (longest - len(r)) for r in rows])

    return {
        "input_ids": pad(data["input_ids"], pad_id),
        "attention_mask": pad(data["attention_mask"], 0),
        "labels": pad(data["labels"], -100),
    }


def packed_batch(data: dict[str, list[list[int]]], pad_id: int) -> dict:
    import datasets

    packed, stats = pack_dataset(datasets.Dataset.from_dict(data), BLOCK)
    assert stats.rows > 2, "the rows must differ in length so that padding segments are exercised"
    return PackedCollator(SimpleNamespace(pad_token_id=pad_id))(list(packed))


def compare(model, data: dict, pad_id: int, alter: Callable | None = None) -> tuple[float, float]:
    """Max abs difference of (loss, logits) between the packed batch and the examples unpacked.

    ``alter`` changes the batch the model is given (to show that the comparison detects leaks).
    """
    batch = packed_batch(data, pad_id)
    model.eval()
    with torch.no_grad():
        packed = model(**(alter(dict(batch)) if alter else batch))
        reference_loss = model(**padded_batch(data, pad_id)).loss
        logits_diff = 0.0
        alone = {tuple(x): model(input_ids=torch.tensor([x])).logits[0] for x in data["input_ids"]}
        for row, positions, out in zip(batch["input_ids"], batch["position_ids"], packed.logits):
            starts = [*(positions == 0).nonzero().flatten().tolist(), len(positions)]
            for begin, end in zip(starts, starts[1:]):
                key = tuple(row[begin:end].tolist())
                if key in alone:  # not the padding segment
                    logits_diff = max(logits_diff, (out[begin:end] - alone.pop(key)).abs().max().item())
        assert not alone, "every example appears in the packed rows"
    return abs(packed.loss.item() - reference_loss.item()), logits_diff


# --------------------------------------------------------------------------------------------------------------
# Packing and collating
# --------------------------------------------------------------------------------------------------------------


def test_plan_rows_fills_rows_best_fit_decreasing_and_deterministically():
    lengths = [5, 9, 3, 7, 2, 8, 1, 4, 30]
    rows = plan_rows(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert [8] in rows, "an example longer than the block gets a row of its own"
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows if row != [8])
    # 39 tokens fit in 4 rows of 10; the longest examples open the rows.
    assert len(rows) == 1 + 4 and rows[1][0] == 1 and rows == plan_rows(lengths, 10)


def test_pack_examples_restarts_positions_and_masks_each_first_label():
    batch = {
        "input_ids": [[11, 12, 13], [21, 22], [31, 32, 33, 34]],
        "labels": [[11, 12, 13], [-100, 22], [31, 32, 33, 34]],
    }
    packed = pack_examples(batch, 9)
    assert packed["input_ids"] == [[31, 32, 33, 34, 11, 12, 13, 21, 22]]
    assert packed["position_ids"] == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert packed["labels"] == [[-100, 32, 33, 34, -100, 12, 13, -100, 22]]


def test_collator_pads_with_a_segment_and_passes_no_attention_mask():
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]},
    ]
    batch = PackedCollator(SimpleNamespace(pad_token_id=0))(rows)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["input_ids"][1].tolist() == [5, 6, 0, 0, 0]
    assert batch["labels"][1].tolist() == [-100, 6, -100, -100, -100]
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2], "padding is a segment of its own"
    # FlashAttention-2's variable-length boundaries over the flattened batch: 0|3|5 and 5|7|10.
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 10] and batch["max_length_q"] == 3


def test_collator_pads_unpacked_examples_with_an_attention_mask(tokenizer):
    features = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "attention_mask": [1, 1, 1], "_full_length": 3}]
    features.append({"input_ids": [5], "labels": [5], "attention_mask": [1], "_full_length": 1})
    batch = PackedCollator(tokenizer)(features)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and "position_ids" not in batch


def test_packing_refuses_columns_it_cannot_carry():
    import datasets

    data = datasets.Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[1, 2]], "images": ["a.png"]})
    with pytest.raises(ConfigError, match="extra columns \\(images\\)"):
        pack_dataset(data, 8)


# --------------------------------------------------------------------------------------------------------------
# Packed == unpacked, architecture by architecture
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_llama_computes_the_unpacked_loss_and_logits(tiny_llama, attention):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attention)
    loss_diff, logits_diff = compare(model, examples(model.config.vocab_size), model.config.pad_token_id)
    print(f"llama/{attention}: loss diff {loss_diff:.2e}, logits diff {logits_diff:.2e}")
    assert loss_diff < TOLERANCE and logits_diff < TOLERANCE


def test_packed_gpt2_computes_the_unpacked_loss_and_logits(tiny_gpt2):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)  # learned absolute positions: they restart too
    loss_diff, logits_diff = compare(model, examples(model.config.vocab_size), model.config.pad_token_id)
    print(f"gpt2: loss diff {loss_diff:.2e}, logits diff {logits_diff:.2e}")
    assert loss_diff < TOLERANCE and logits_diff < TOLERANCE


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "phi3", "gemma"])
def test_packed_rows_compute_the_unpacked_results_for_other_architectures(model_type):
    model = tiny_model(model_type, attn_implementation="sdpa", **COMMON, **SHAPES[model_type])
    assert packing_problem(model.config) is None
    loss_diff, logits_diff = compare(model, examples(128), 0)
    print(f"{model_type}: loss diff {loss_diff:.2e}, logits diff {logits_diff:.2e}")
    assert loss_diff < TOLERANCE and logits_diff < TOLERANCE


def test_the_comparison_catches_packed_examples_that_attend_to_each_other(tiny_llama):
    """Without ``use_cache=False`` (a cache skips the packed-mask detection) or without restarting positions,
    examples leak into each other, and the comparison shows it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    data = examples(model.config.vocab_size)
    assert model.config.use_cache

    def with_cache(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k != "use_cache"}

    def running_positions(batch: dict) -> dict:
        ids = batch["input_ids"]
        return dict(batch, position_ids=torch.arange(ids.shape[1]).expand_as(ids))

    assert min(compare(model, data, 0, with_cache)) > 1e-3
    assert min(compare(model, data, 0, running_positions)) > 1e-3


def test_architectures_are_judged_by_how_they_build_their_masks():
    for model_type in ("llama", "gpt2", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "starcoder2"):
        assert packing_problem(AutoConfig.for_model(model_type)) is None, model_type
    assert "without position ids" in packing_problem(AutoConfig.for_model("bloom"))
    assert "without position ids" in packing_problem(AutoConfig.for_model("opt"))
    assert "linear_attention layers" in packing_problem(AutoConfig.for_model("jamba"))
    assert "not one of transformers' causal language models" in packing_problem(AutoConfig.for_model("t5"))


def test_a_refused_architecture_would_indeed_mix_packed_examples():
    model = tiny_model("bloom", attn_implementation="eager", **COMMON, **SHAPES["bloom"])
    with pytest.raises(ConfigError, match="--packing: the architecture 'bloom'"):
        check_packing_support(model.config)
    _, logits_diff = compare(model, examples(128), 0)
    assert logits_diff > 1e-3, "ALiBi without position ids: later examples see the earlier ones"


# --------------------------------------------------------------------------------------------------------------
# lmflow run --packing
# --------------------------------------------------------------------------------------------------------------


def varied_conversations() -> list[dict]:
    """Conversations of 1 to 12 answer words, so packed rows hold different numbers of examples."""
    out = []
    for i in range(12):
        words = " ".join(str(k) for k in range(1, i + 2))
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"Count to {i + 1}."},
                    {"role": "assistant", "content": f"{words}."},
                ]
            }
        )
    return out * 3


@pytest.fixture
def packed_mask_calls(monkeypatch) -> list:
    """What transformers' packed-sequence detection found in each forward pass. It is consulted only when a
    forward has position ids, no attention mask and no KV cache."""
    found = []
    real = masking_utils.find_packed_sequence_indices

    def spy(position_ids):
        result = real(position_ids)
        found.append(result)
        return result

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", spy)
    return found


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_run_with_packing_trains_end_to_end(runner, tiny_llama, tmp_path, packed_mask_calls, checkpointing):
    data = write_json(tmp_path / "chat.json", {"type": "conversation", "instances": varied_conversations()})
    args = [
        "run", "--model", tiny_llama, "--dataset", data, "--template", "chatml",
        "--output-dir", tmp_path / "out", "--packing", "--block-size", "96", "--max-steps", "16",
        "--batch-size", "2", "--learning-rate", "1e-2", "--logging-steps", "1", "--save-steps", "0",
    ]  # fmt: skip
    if checkpointing:
        args.append("--gradient-checkpointing")
    else:  # evaluation data stays unpacked and is scored example by example
        args += ["--eval-dataset", data, "--eval-steps", "8"]
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.output + result.stderr

    packing_line = [line for line in result.output.splitlines() if line.startswith("packing (train): ")]
    assert len(packing_line) == 1 and "36 examples -> " in packing_line[0], result.output
    record = json.loads((tmp_path / "out" / "lmflow_run.json").read_text())
    packing = record["result"]["data"]["train"]["packing"]
    assert packing["examples"] == 36 and packing["rows"] < 36 and 0.8 < packing["fill"] <= 1.0
    assert "packing" not in record["result"]["data"].get("eval", {})
    if not checkpointing:
        assert record["result"]["eval"]["eval_samples"] == 36
    losses = [loss for _, loss in record["result"]["losses"]]
    assert losses[-1] < 0.6 * losses[0], losses
    # Every training forward took transformers' packed-mask path: no cache, no attention mask, rows found.
    # (Evaluation passes an attention mask, so it never reaches the detection.)
    assert len(packed_mask_calls) == 16 and all(found is not None for found in packed_mask_calls)


def test_grouped_text_data_is_left_as_it_is(runner, tiny_llama, text_data, tmp_path):
    result = invoke(
        runner, "run", "--model", tiny_llama, "--dataset", text_data, "--output-dir", tmp_path / "out",
        "--packing", "--max-steps", "1", "--save-steps", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    assert "note: --packing: text_only data is already grouped into full blocks" in result.output
    assert "packing (train)" not in result.output


def test_packing_is_refused_for_an_architecture_that_would_mix_examples(
    runner, chat_data, tmp_path, monkeypatch
):
    loads = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a))
    model_dir = tmp_path / "bloom"
    AutoConfig.for_model("bloom", hidden_size=32, n_head=4, n_layer=2).save_pretrained(model_dir)
    result = invoke(
        runner, "run", "--model", model_dir, "--dataset", chat_data, "--template", "chatml",
        "--output-dir", tmp_path / "out", "--packing",
    )  # fmt: skip
    assert result.exit_code == 2, result.output + result.stderr
    assert result.stderr.startswith("Error: --packing: the architecture 'bloom' (BloomForCausalLM)")
    assert result.stderr.count("\n") == 1 and "Drop --packing for this model." in result.stderr
    assert not loads and not (tmp_path / "out").exists()
