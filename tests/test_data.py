"""Dataset formats, validation errors, loss masks, truncation, caching and `lmflow data check`."""

from __future__ import annotations

import json
import re

import pytest
from helpers import conversations, invoke, write_json
from transformers import AutoTokenizer

from lmflow_core.catalog import get_template
from lmflow_core.data import load_raw_dataset, tokenize_dataset
from lmflow_core.demo import demo_model_dir
from lmflow_core.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_model_dir())


@pytest.fixture(scope="module")
def chatml():
    return get_template("chatml")


def decode_trained(tokenizer, ids, labels):
    """The text of the trained tokens, runs of them joined by '|'."""
    pieces, run = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            run.append(token)
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    if run:
        pieces.append(tokenizer.decode(run))
    return "|".join(pieces)


# ---- formats ----------------------------------------------------------------------------------------------


def test_lmflow_json_of_each_type(tmp_path):
    text = load_raw_dataset(
        write_json(tmp_path / "t.json", {"type": "text_only", "instances": [{"text": "a b"}]})
    )
    assert text.type == "text_only" and text.records == [{"text": "a b"}]
    pair = load_raw_dataset(
        write_json(tmp_path / "p.json", {"type": "text2text", "instances": [{"input": "q", "output": "a"}]})
    )
    assert pair.type == "text2text" and pair.records == [{"input": "q", "output": "a"}]
    chat = load_raw_dataset(
        write_json(tmp_path / "c.json", {"type": "conversation", "instances": conversations(2)})
    )
    assert chat.type == "conversation" and chat.records[0]["system"] is None
    assert chat.records[1]["messages"][1] == {"role": "assistant", "content": "1 plus 1 is 2."}


def test_jsonl_infers_the_type_and_reports_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "q", "output": "a"}\n\n{"input": "q2", "output": 3}\n')
    with pytest.raises(DataError, match=r"d\.jsonl: line 3: \"output\" must be a string, got int"):
        load_raw_dataset(path)
    path.write_text('{"input": "q", "output": "a"}\n\n{"input": "q2", "output": "b"}\n')
    assert len(load_raw_dataset(path)) == 2


def test_alpaca_records_become_one_turn_conversations(tmp_path):
    path = write_json(
        tmp_path / "alpaca.json",
        [
            {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        ],
    )
    raw = load_raw_dataset(path)
    assert raw.type == "conversation" and raw.converted["alpaca"] == 2
    assert raw.records[0]["messages"] == [
        {"role": "user", "content": "Translate to French.\n\ncat"},
        {"role": "assistant", "content": "chat"},
    ]
    assert raw.records[1]["messages"][0]["content"] == "Say hi."


def test_a_directory_reads_every_file_in_name_order(tmp_path):
    write_json(tmp_path / "b.json", {"type": "text_only", "instances": [{"text": "second"}]})
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n')
    (tmp_path / "notes.txt").write_text("ignored")
    raw = load_raw_dataset(tmp_path)
    assert [r["text"] for r in raw.records] == ["first", "second"]


def test_a_leading_system_message_becomes_the_system_prompt(tmp_path):
    record = {"messages": [{"role": "system", "content": "Be brief."}, *conversations(1)[0]["messages"]]}
    raw = load_raw_dataset(write_json(tmp_path / "c.json", [record]))
    assert raw.records[0]["system"] == "Be brief." and len(raw.records[0]["messages"]) == 2


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"type": "conversation", "instances": [{"messages": []}]},
            r"instance 0: \"messages\" must be a non-empty list",
        ),
        (
            {
                "type": "conversation",
                "instances": conversations(2) + [{"messages": [{"role": "user", "content": "hi"}]}],
            },
            r"instance 2 has no assistant message",
        ),
        (
            {"type": "conversation", "instances": [{"messages": [{"role": "robot", "content": "x"}]}]},
            r"instance 0: message 0 has unknown role 'robot'",
        ),
        (
            {"type": "conversation", "instances": [{"messages": [{"role": "user", "content": ["x"]}]}]},
            r"message 0: content part 0 must be \{\"type\": \"text\", \"text\": \"...\"\}",
        ),
        (
            {"type": "text_only", "instances": [{"text": "ok"}, {"text": "  "}]},
            r"instance 1: \"text\" is empty",
        ),
        ({"type": "text_only", "instances": [{"txt": "typo"}]}, r"instance 0 has no \"text\""),
        ({"type": "text_only", "instances": ["just a string"]}, r"instance 0 must be a JSON object, got str"),
        (
            {"type": "text2txt", "instances": []},
            r"\"type\" is 'text2txt'; expected one of text_only, text2text, conversation",
        ),
        ({"instances": {"a": 1}, "type": "text_only"}, r"\"instances\" must be a list"),
        (
            [{"text": "a"}, {"input": "q", "output": "a"}],
            r"record 1 is a text2text record but earlier records are text_only",
        ),
        (
            [{"question": "?"}],
            r"record 0 has keys \['question'\] and fits none of the formats tried: OpenAI chat",
        ),
    ],
)
def test_malformed_records_name_the_file_and_record(tmp_path, data, message):
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(DataError, match=message) as err:
        load_raw_dataset(path)
    assert "bad.json" in str(err.value)


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"type": "text_only",\n "instances": [{"text": "a"},]}')
    with pytest.raises(DataError, match=r"broken\.json is not valid JSON \(line 2, column"):
        load_raw_dataset(path)


def test_missing_paths_and_wrong_extensions_are_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_raw_dataset(tmp_path / "nope.json")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"is not a \.json or \.jsonl file"):
        load_raw_dataset(tmp_path / "data.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .json or .jsonl file"):
        load_raw_dataset(empty)


def test_template_rules_are_checked_per_record(tmp_path, chatml):
    bad = {"messages": [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "ok"}]}
    path = write_json(tmp_path / "c.json", {"type": "conversation", "instances": [*conversations(3), bad]})
    with pytest.raises(
        DataError, match=r"instance 3: message 0 is from 'assistant' but roles must alternate"
    ):
        load_raw_dataset(path, chatml)


def test_max_samples_keeps_the_first_records(tmp_path):
    raw = load_raw_dataset(
        write_json(tmp_path / "c.json", {"type": "conversation", "instances": conversations(10)}),
        max_samples=3,
    )
    assert len(raw) == 3


# ---- tokenization and masks --------------------------------------------------------------------------------


def test_conversation_masks_train_assistant_text_and_end_of_turn_only(tmp_path, tokenizer, chatml):
    record = {
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "2 plus 2 is 4."},
            {"role": "user", "content": "And 3 plus 3?"},
            {"role": "assistant", "content": "3 plus 3 is 6."},
        ],
    }
    raw = load_raw_dataset(write_json(tmp_path / "c.json", [record]), chatml)
    data, stats = tokenize_dataset(raw, tokenizer, 512, chatml, use_cache=False)
    ids, labels = data[0]["input_ids"], data[0]["labels"]
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n"
        "<|im_start|>assistant\n2 plus 2 is 4.<|im_end|>\n<|im_start|>user\nAnd 3 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n3 plus 3 is 6.<|im_end|>\n"
    )
    assert decode_trained(tokenizer, ids, labels) == "2 plus 2 is 4.<|im_end|>|3 plus 3 is 6.<|im_end|>"
    assert data[0]["attention_mask"] == [1] * len(ids)
    assert stats.trained_tokens == sum(label != -100 for label in labels)


def test_conversation_ids_equal_the_tokenized_rendered_prompt(tmp_path, tokenizer, chatml):
    """Training tokens are exactly those of the rendered text, as inference will see them."""
    raw = load_raw_dataset(write_json(tmp_path / "c.json", conversations(5)), chatml)
    data, _ = tokenize_dataset(raw, tokenizer, 512, chatml, use_cache=False)
    from lmflow_core.templates import Conversation, render_text

    for record, example in zip(raw.records, data):
        text = render_text(chatml.render(Conversation.from_messages(record["messages"]), False, tokenizer))
        assert example["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_text2text_trains_the_output_and_eos_only(tmp_path, tokenizer):
    raw = load_raw_dataset(
        write_json(
            tmp_path / "p.json",
            {"type": "text2text", "instances": [{"input": "Question: sky?", "output": " Blue."}]},
        )
    )
    data, _ = tokenize_dataset(raw, tokenizer, 512, use_cache=False)
    assert decode_trained(tokenizer, data[0]["input_ids"], data[0]["labels"]) == " Blue.<|im_end|>"
    assert data[0]["input_ids"][-1] == tokenizer.eos_token_id


def test_text_only_is_grouped_into_full_blocks(tmp_path, tokenizer):
    texts = [f"Line {i} of a long document about rivers." for i in range(30)]
    raw = load_raw_dataset(
        write_json(tmp_path / "t.json", {"type": "text_only", "instances": [{"text": t} for t in texts]})
    )
    data, stats = tokenize_dataset(raw, tokenizer, 32, group_texts=True, use_cache=False)
    lengths = [len(x) for x in data["input_ids"]]
    assert all(n == 32 for n in lengths[:-1]) and 0 < lengths[-1] <= 32
    total = sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts)  # each text ends with EOS
    assert sum(lengths) == total and stats.truncated == 0
    assert data[0]["labels"] == data[0]["input_ids"]


def test_long_examples_are_truncated_and_counted_and_untrained_ones_dropped(tmp_path, tokenizer, chatml):
    long_question = "word " * 80
    records = [
        *conversations(3),
        {"messages": [{"role": "user", "content": "Short?"}, {"role": "assistant", "content": "word " * 60}]},
        {"messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "ok"}]},
    ]
    raw = load_raw_dataset(write_json(tmp_path / "c.json", records), chatml)
    data, stats = tokenize_dataset(raw, tokenizer, 40, chatml, use_cache=False)
    assert stats.records == 5 and stats.truncated == 2 and stats.dropped_untrained == 1
    assert stats.examples == len(data) == 4
    assert max(len(x) for x in data["input_ids"]) == 40
    assert stats.length_max > 80


def test_tokenization_is_cached_and_the_cache_is_keyed_by_settings(tmp_path, tokenizer, chatml):
    raw = load_raw_dataset(write_json(tmp_path / "c.json", conversations(6)), chatml)
    first, stats1 = tokenize_dataset(raw, tokenizer, 64, chatml)
    second, stats2 = tokenize_dataset(raw, tokenizer, 64, chatml)
    assert not stats1.cached and stats2.cached
    assert first["input_ids"] == second["input_ids"] and first["labels"] == second["labels"]
    _, stats3 = tokenize_dataset(raw, tokenizer, 48, chatml)
    assert not stats3.cached
    # Changing the data file (same number of records) invalidates the cache.
    changed = conversations(6)
    changed[0]["messages"][1]["content"] = "A different answer."
    write_json(tmp_path / "c.json", changed)
    raw = load_raw_dataset(tmp_path / "c.json", chatml)
    third, stats4 = tokenize_dataset(raw, tokenizer, 64, chatml)
    assert not stats4.cached and third["input_ids"][0] != first["input_ids"][0]


# ---- lmflow data check -------------------------------------------------------------------------------------


def test_data_check_prints_counts_lengths_and_truncation(runner, tmp_path):
    records = [
        *conversations(9),
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y " * 100}]},
    ]
    path = write_json(tmp_path / "c.json", {"type": "conversation", "instances": records})
    result = invoke(runner, "data", "check", path, "--block-size", "64")
    assert result.exit_code == 0, result.output
    assert "(conversation, 1 file)" in result.output
    assert "records: 10" in result.output
    assert "block size 64: 1 example would be truncated" in result.output
    info = json.loads(invoke(runner, "data", "check", path, "--block-size", "64", "--json").output)
    assert info["records"] == 10 and info["truncated"] == 1 and info["template"] == "chatml"
    assert info["length_max"] > 64


def test_data_check_and_a_run_share_the_tokenization_cache(runner, tmp_path, tiny_llama):
    path = write_json(tmp_path / "c.json", conversations(12))
    first = invoke(runner, "data", "check", path, "--model", tiny_llama)
    second = invoke(runner, "data", "check", path, "--model", tiny_llama, "--json")
    assert first.exit_code == second.exit_code == 0, first.output + second.output
    assert "read from the cache" not in first.output
    # the first check reports its reading and tokenization: time and throughput
    assert re.search(
        r"records: 12, read in \d+\.\ds \(\d+ MB/s\), tokenized in \d+\.\ds \([\d,]+ records/s\)",
        first.output,
    )
    assert json.loads(second.stdout)["cached"] is True
    from lmflow_core import run

    run(
        model=str(tiny_llama),
        dataset=str(path),
        template="chatml",
        output_dir=str(tmp_path / "out"),
        max_steps=1,
    )
    assert json.loads((tmp_path / "out" / "lmflow_run.json").read_text())["result"]["data"]["train"]["cached"]
    # Changed data is tokenized again.
    write_json(path, conversations(11))
    third = invoke(runner, "data", "check", path, "--model", tiny_llama)
    assert "records: 11" in third.output and "read from the cache" not in third.output


def test_data_check_stops_quietly_when_its_reader_goes_away(tmp_path):
    import subprocess
    import sys

    path = write_json(tmp_path / "c.json", conversations(4))
    child = subprocess.Popen(
        [sys.executable, "-c", "from lmflow_core.cli import main; main()", "data", "check", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    child.stdout.close()  # the reader is gone before the first line, as with `| head -0`: every write fails
    assert child.wait(timeout=120) == 141
    assert child.stderr.read() == b""


def test_data_check_reports_a_malformed_record_in_one_line(runner, tmp_path):
    path = write_json(tmp_path / "c.json", {"type": "conversation", "instances": [{"messages": "nope"}]})
    result = invoke(runner, "data", "check", path)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: ") and "c.json: instance 0" in result.stderr


def test_tokenizing_in_several_processes_gives_the_same_examples(tiny_llama, tmp_path):
    """--preprocessing-workers: the examples, masks and statistics of two processes equal one process's; the
    statistics record the processes and the time, which data check reports."""
    from transformers import AutoTokenizer

    from lmflow_core import get_template
    from lmflow_core.data import load_raw_dataset, tokenize_dataset

    template = get_template("chatml")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    raw = load_raw_dataset(
        write_json(tmp_path / "c.json", {"type": "conversation", "instances": conversations(40)}), template
    )
    one, one_stats = tokenize_dataset(raw, tokenizer, 24, template, use_cache=False)
    two, two_stats = tokenize_dataset(raw, tokenizer, 24, template, use_cache=False, workers=2)
    assert one.to_dict() == two.to_dict()
    assert (one_stats.workers, two_stats.workers) == (1, 2) and two_stats.seconds > 0
    assert {**one_stats.to_dict(), "workers": 0, "seconds": 0} == {
        **two_stats.to_dict(),
        "workers": 0,
        "seconds": 0,
    }
    assert one_stats.truncated > 0  # the cut is part of what is compared
