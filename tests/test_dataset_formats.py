"""The record formats people already have: ShareGPT, OpenAI chat (content parts included), Alpaca and plain
text, detected from each record's keys or named with --dataset-format."""

from __future__ import annotations

import json

import pytest
from helpers import assert_one_line_error, invoke, write_json
from transformers import AutoTokenizer

from lmflow_core.catalog import get_template
from lmflow_core.data import load_raw_dataset, tokenize_dataset
from lmflow_core.demo import demo_model_dir
from lmflow_core.errors import DataError

SHAREGPT = [
    {
        "id": "a",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Goodbye."},
        ],
    },
    {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "weather", "arguments": {"city": "Oslo"}}),
            },
            {"from": "observation", "value": '{"temp": -3}'},
            {"from": "gpt", "value": "It is -3."},
        ],
        "tools": json.dumps([{"type": "function", "function": {"name": "weather", "parameters": {}}}]),
    },
]
# The same two conversations as OpenAI chat records.
OPENAI = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
                ],
            },
            {"role": "tool", "content": '{"temp": -3}'},
            {"role": "assistant", "content": "It is -3."},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
    },
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_model_dir())


def tokenized(raw, tokenizer, template):
    data, _ = tokenize_dataset(raw, tokenizer, 512, template, use_cache=False)
    return data["input_ids"], data["labels"]


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_sharegpt_and_openai_records_train_exactly_the_same_tokens(tmp_path, tokenizer):
    qwen = get_template("qwen2_5")  # renders the system prompt, tool definitions, calls and results
    sharegpt = load_raw_dataset(jsonl(tmp_path / "sg.jsonl", SHAREGPT), qwen)
    openai = load_raw_dataset(jsonl(tmp_path / "oa.jsonl", OPENAI), qwen)
    assert sharegpt.formats == {"sharegpt": 2} and sharegpt.converted == {"sharegpt": 2}
    assert openai.formats == {"openai": 2} and not openai.converted
    assert sharegpt.records == openai.records
    assert sharegpt.records[0]["system"] == "Be brief."
    assert json.loads(sharegpt.records[1]["messages"][1]["tool_calls"]) == [
        {"name": "weather", "arguments": {"city": "Oslo"}}
    ]
    ids, labels = tokenized(sharegpt, tokenizer, qwen)
    assert (ids, labels) == tokenized(openai, tokenizer, qwen)
    trained = tokenizer.decode([t for t, label in zip(ids[1], labels[1]) if label != -100])
    assert (
        "weather" in trained and "It is -3." in trained and "Oslo?" not in trained and "temp" not in trained
    )


def test_sharegpt_turns_under_messages_and_speaker_aliases(tmp_path):
    records = [
        {"messages": [{"from": "user", "value": "Hi"}, {"from": "chatgpt", "value": "Hello."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "model", "value": "Hello."}]},
    ]
    raw = load_raw_dataset(write_json(tmp_path / "d.json", records))
    assert raw.formats == {"sharegpt": 2}
    assert (
        raw.records[0]
        == raw.records[1]
        == {
            "system": None,
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        }
    )


def test_openai_content_parts_are_joined_as_the_official_templates_join_them(tmp_path):
    record = {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi "}, {"type": "input_text", "text": "you"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
        ]
    }
    raw = load_raw_dataset(write_json(tmp_path / "d.json", [record]))
    assert raw.records[0] == {
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hi you"}, {"role": "assistant", "content": "Hello."}],
    }


def test_plain_text_and_alpaca_are_detected(tmp_path):
    text = load_raw_dataset(jsonl(tmp_path / "t.jsonl", [{"text": "Some text."}]))
    alpaca = load_raw_dataset(
        jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1+1", "output": "2"}])
    )
    assert (text.type, text.formats) == ("text_only", {"text": 1})
    assert (alpaca.type, alpaca.formats, alpaca.converted) == ("conversation", {"alpaca": 1}, {"alpaca": 1})


def test_a_named_format_reads_every_record_as_that_format(tmp_path):
    # A record with both keys: detection takes "messages"; --dataset-format text reads its "text".
    both = jsonl(
        tmp_path / "both.jsonl",
        [
            {
                "text": "Plain.",
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            }
        ],
    )
    assert load_raw_dataset(both).type == "conversation"
    assert load_raw_dataset(both, dataset_format="text").records == [{"text": "Plain."}]


@pytest.mark.parametrize(
    "records, dataset_format, message",
    [
        (
            [{"question": "?"}],
            "auto",
            r"line 1 has keys \['question'\] and fits none of the formats tried: OpenAI",
        ),
        (SHAREGPT, "openai", r'line 1 is not in the OpenAI chat \("messages"\) format: it has no "messages"'),
        (OPENAI, "sharegpt", r'line 1 is not in the ShareGPT \("conversations"\) format'),
        (
            OPENAI,
            "alpaca",
            r'line 1 is not in the Alpaca \("instruction", "output"\) format: it has no "instr',
        ),
        (
            OPENAI,
            "lmflow",
            r'is not an LMFlow dataset \(\{"type", "instances"\}\) but --dataset-format is lm',
        ),
        (
            [{"conversations": [{"from": "alien", "value": "x"}]}],
            "auto",
            r"line 1: turn 0 is from 'alien'; ShareGPT speakers are human, user, gpt",
        ),
        (
            [
                {
                    "conversations": [
                        {"from": "human", "value": "x"},
                        {"from": "function_call", "value": "{oops"},
                    ]
                }
            ],
            "auto",
            r"line 1: turn 1 is a function_call whose value is not JSON",
        ),
        (
            [
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                        {"role": "assistant", "content": "y"},
                    ]
                }
            ],
            "auto",
            r"line 1: message 0: content part 0 is 'image_url', which a text model cannot be trained on",
        ),
    ],
)
def test_records_that_fit_no_format_name_the_record_and_the_formats(
    tmp_path, records, dataset_format, message
):
    with pytest.raises(DataError, match=message) as err:
        load_raw_dataset(jsonl(tmp_path / "bad.jsonl", records), dataset_format=dataset_format)
    assert "bad.jsonl" in str(err.value)


def test_an_lmflow_file_is_not_read_as_another_format(tmp_path):
    path = write_json(tmp_path / "l.json", {"type": "text_only", "instances": [{"text": "x"}]})
    with pytest.raises(DataError, match=r'is an LMFlow dataset \("type": "text_only"\), not ShareGPT'):
        load_raw_dataset(path, dataset_format="sharegpt")
    assert load_raw_dataset(path, dataset_format="lmflow").formats == {"lmflow": 1}


def test_data_check_shows_the_format_it_detected(tmp_path, runner):
    path = jsonl(tmp_path / "sg.jsonl", SHAREGPT)
    result = invoke(runner, "data", "check", path, "--template", "qwen2_5")
    assert result.exit_code == 0, result.output
    assert 'format: ShareGPT ("conversations") (2 records) (detected)' in result.output
    assert "records: 2 (2 converted from sharegpt)" in result.output
    as_json = invoke(runner, "data", "check", path, "--template", "qwen2_5", "--json")
    assert json.loads(as_json.stdout)["formats"] == {"sharegpt": 2}
    forced = invoke(runner, "data", "check", path, "--dataset-format", "openai")
    assert_one_line_error(forced, 'sg.jsonl: line 1 is not in the OpenAI chat ("messages") format')
    unknown = invoke(runner, "data", "check", path, "--dataset-format", "chatgpt")
    assert unknown.exit_code == 2 and "'chatgpt' is not one of 'auto', 'lmflow', 'openai'" in unknown.output


def test_a_run_reads_a_named_format_and_records_the_formats(tmp_path, tiny_llama):
    from lmflow_core import run

    data = write_json(tmp_path / "sg.json", SHAREGPT * 4)
    out = tmp_path / "out"
    run(
        model=str(tiny_llama),
        dataset=str(data),
        template="qwen2_5",
        output_dir=str(out),
        max_steps=1,
        save_steps=0,
        dataset_format="sharegpt",
    )
    record = json.loads((out / "lmflow_run.json").read_text())
    assert record["result"]["data"]["train"]["formats"] == {"sharegpt": 8}
    assert record["result"]["data"]["train"]["converted"] == {"sharegpt": 8}


def test_rows_read_through_arrow_with_absent_keys_as_none_keep_their_format(tmp_path):
    import datasets

    # One Arrow table holding both shapes: every row gets every key, the absent ones as None (as hub rows do).
    mixed = jsonl(tmp_path / "mixed.jsonl", [SHAREGPT[0], OPENAI[0], OPENAI[1]])
    rows = list(datasets.load_dataset("json", data_files=str(mixed), split="train", cache_dir=str(tmp_path)))
    assert rows[0]["messages"] is None and rows[1]["conversations"] is None
    raw = load_raw_dataset(jsonl(tmp_path / "arrow.jsonl", rows))
    assert raw.formats == {"sharegpt": 1, "openai": 2}
    assert raw.records[0] == raw.records[1]


def test_turns_marked_not_to_train_are_refused_not_trained(tmp_path):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bad.", "weight": 0}]
    with pytest.raises(
        DataError, match=r"line 1: message 1 has weight 0; lmflow trains every assistant message"
    ):
        load_raw_dataset(jsonl(tmp_path / "w.jsonl", [{"messages": chat}]))
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Bad.", "weight": 0.0}]
    with pytest.raises(DataError, match=r"message 1 has weight 0.0"):
        load_raw_dataset(jsonl(tmp_path / "s.jsonl", [{"conversations": turns}]))
    chat[1]["weight"] = 1
    assert load_raw_dataset(jsonl(tmp_path / "ok.jsonl", [{"messages": chat}])).records[0]["messages"][1] == {
        "role": "assistant",
        "content": "Bad.",
    }


def test_a_function_call_turn_may_hold_parallel_calls(tmp_path):
    calls = [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"x": 1}}]
    turns = [
        {"from": "human", "value": "Do both."},
        {"from": "function_call", "value": json.dumps(calls)},
        {"from": "observation", "value": "done"},
        {"from": "gpt", "value": "Done."},
    ]
    raw = load_raw_dataset(jsonl(tmp_path / "p.jsonl", [{"conversations": turns}]))
    assert json.loads(raw.records[0]["messages"][1]["tool_calls"]) == calls


def test_twin_records_of_two_formats_report_their_own_conversions_from_the_cache(tmp_path, runner):
    first = invoke(runner, "data", "check", jsonl(tmp_path / "sg.jsonl", SHAREGPT[:1]))
    second = invoke(runner, "data", "check", jsonl(tmp_path / "oa.jsonl", OPENAI[:1]))
    assert "(1 converted from sharegpt)" in first.output
    assert "read from the cache" in second.output and "converted" not in second.output
