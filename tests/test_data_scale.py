"""Data at scale: records are read as a stream into memory-mapped Arrow files, validated records and tokenized
examples are cached by the files' contents, preparation is shared between processes, and memory does not grow
with the dataset (a file larger than the process's memory limit is prepared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lmflow_core import DataError
from lmflow_core.catalog import get_template
from lmflow_core.data import formats, load_raw_dataset, tokenize_dataset
from lmflow_core.data.store import Records, cache_root
from lmflow_core.demo import demo_model_dir

CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"Question {i}? " * (1 + i % 5)},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    }
    for i in range(40)
]


@pytest.fixture(scope="module")
def demo_tokenizer_dir() -> Path:
    return demo_model_dir()


@pytest.fixture(scope="module")
def tokenizer(demo_tokenizer_dir):
    return AutoTokenizer.from_pretrained(demo_tokenizer_dir)


@pytest.fixture(scope="module")
def chatml():
    return get_template("chatml")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tiny_read_ahead(monkeypatch):
    """Read JSON files 7 bytes at a time: every value is cut by the read-ahead somewhere."""
    monkeypatch.setattr(formats, "_READ_AHEAD", 7)


def test_json_lists_and_lmflow_files_stream_to_the_same_records_as_json_lines(tmp_path, tiny_read_ahead):
    lines = load_raw_dataset(write_jsonl(tmp_path / "chats.jsonl", CHATS))
    listed = tmp_path / "chats.json"
    listed.write_text(json.dumps(CHATS, indent=2))
    # "type" after "instances": the instances are parsed once to find it, then read
    late_type = tmp_path / "late.json"
    late_type.write_text(json.dumps({"instances": CHATS, "note": [1, {"x": 2.5e3}], "type": "conversation"}))
    assert isinstance(lines.records, Records) and len(lines) == 40
    for path, fmt in ((listed, "openai"), (late_type, "lmflow")):
        raw = load_raw_dataset(path)
        assert raw.records == lines.records and dict(raw.formats) == {fmt: 40}
    numbers = tmp_path / "numbers.json"
    numbers.write_text('[{"text": "a", "n": 1234567890123}, {"text": "b", "n": -0.000125}]')
    assert load_raw_dataset(numbers).records == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize(
    "text",
    [
        '[{"text": "a"},\n {"text": "b"}\n {"text": "c"}]',  # a missing comma
        '[{"text": "a"},\n\n   {"text": "b", }]',  # a trailing comma in an object
        '{"type": "text_only",\n "instances": [{"text": "a"}, {"text": "b"\n]}',
        '[{"text": "a"}]\n\n  x',  # extra data
        '[{"text": "a"}, {"text": "caf\u00e9 \u2603 \\ud83d\\ude00"},\n {"text": tru}]',
    ],
)
def test_syntax_errors_name_the_line_and_column_json_names(tmp_path, tiny_read_ahead, text):
    path = tmp_path / "broken.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    where = f"line {expected.value.lineno}, column {expected.value.colno}"
    with pytest.raises(DataError, match=rf"broken\.json is not valid JSON \({where}: "):
        load_raw_dataset(path)


def test_a_line_longer_than_a_record_can_be_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "RECORD_LIMIT", 1000)
    path = tmp_path / "endless.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "' + "x" * 5000 + '"}\n')
    with pytest.raises(
        DataError, match=r"endless\.jsonl: line 2 holds more than the 1000 B lmflow reads as one"
    ):
        load_raw_dataset(path)
    listed = tmp_path / "endless.json"
    listed.write_text('[{"text": "fine"}, {"text": "' + "x" * 5000 + "")  # cut off: never ends
    with pytest.raises(DataError, match=r"endless\.json: record 1 holds more than the 1000 B"):
        load_raw_dataset(listed)


def test_validated_records_are_cached_by_content_and_read_again_when_the_file_changes(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    first = load_raw_dataset(path)
    assert not first.cached and first.seconds > 0 and first.bytes == path.stat().st_size
    again = load_raw_dataset(path)
    assert again.cached and again.records == first.records and again.fingerprint == first.fingerprint
    # The same size, another byte: a changed file is read again (and an error in it still found).
    text = path.read_text().replace("Answer 3.", "Answer 9.")
    path.write_text(text)
    changed = load_raw_dataset(path)
    assert not changed.cached and changed.fingerprint != first.fingerprint
    assert changed.records[3]["messages"][1]["content"] == "Answer 9."
    path.write_text(text.replace('"assistant"', '"robot"', 1))
    with pytest.raises(DataError, match=r"chats\.jsonl: line 1: message 1 has unknown role 'robot'"):
        load_raw_dataset(path)
    # --max-samples is part of what is cached
    path.write_text(text)
    assert len(load_raw_dataset(path, max_samples=5)) == 5 and len(load_raw_dataset(path)) == 40


def test_a_cached_start_reads_no_record(tmp_path, monkeypatch, tokenizer, chatml):
    path = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    raw = load_raw_dataset(path, chatml)
    data, stats = tokenize_dataset(raw, tokenizer, 64, chatml)
    monkeypatch.setattr(formats, "_jsonl_items", lambda *a: pytest.fail("the file was parsed again"))
    cached_raw = load_raw_dataset(path, chatml)
    cached, cached_stats = tokenize_dataset(cached_raw, tokenizer, 64, chatml)
    assert cached_raw.cached and cached_stats.cached
    assert cached["input_ids"] == data["input_ids"] and cached["labels"] == data["labels"]
    assert {**cached_stats.to_dict(), "cached": False} == stats.to_dict()


def test_tokenized_examples_are_memory_mapped_in_small_integers(tmp_path, tokenizer, chatml):
    raw = load_raw_dataset(write_jsonl(tmp_path / "chats.jsonl", CHATS), chatml)
    data, _ = tokenize_dataset(raw, tokenizer, 64, chatml)
    assert data.cache_files and all(str(cache_root()) in f["filename"] for f in data.cache_files)
    assert str(data.features["input_ids"].feature.dtype) == "int32"
    assert str(data.features["attention_mask"].feature.dtype) == "int8"
    assert data.column_names == ["input_ids", "labels", "attention_mask"]


PREPARE = textwrap.dedent(
    """
    import json, sys, time
    from lmflow_core.catalog import get_template
    from lmflow_core.data import load_raw_dataset, tokenize_dataset
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    chatml = get_template("chatml")
    started = time.time()
    raw = load_raw_dataset(sys.argv[2], chatml)
    _, stats = tokenize_dataset(raw, tokenizer, 64, chatml)
    print(json.dumps({"started": started, "ended": time.time(), "cached": stats.cached, "records": raw.cached}))
    """
)


def test_processes_preparing_the_same_data_take_turns_and_prepare_it_once(tmp_path, demo_tokenizer_dir):
    """Two processes (as under --nproc) asking for the same new data: one reads and tokenizes it, the other
    waits for the entry without a time limit and reads it from the cache."""
    path = write_jsonl(tmp_path / "chats.jsonl", CHATS * 50)
    env = {**os.environ, "LMFLOW_CACHE": str(tmp_path / "cache")}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARE, str(demo_tokenizer_dir), str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted((r["records"], r["cached"]) for r in results) == [(False, False), (True, True)]


MEMORY_LIMITED = textwrap.dedent(
    """
    import json, resource, sys
    from lmflow_core.catalog import get_template
    from lmflow_core.data import load_raw_dataset, tokenize_dataset
    from transformers import AutoTokenizer

    def data_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024

    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    # Everything a preparation loads, loaded before the limit (a small dataset of the same kind, uncached)
    warm = load_raw_dataset(sys.argv[3])
    tokenize_dataset(warm, tokenizer, 64, use_cache=False)
    headroom = int(sys.argv[4])
    limit = data_bytes() + headroom
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    raw = load_raw_dataset(sys.argv[2])
    data, stats = tokenize_dataset(raw, tokenizer, 64)
    print(json.dumps({"records": len(raw), "examples": stats.examples, "headroom": headroom}))
    """
)


def test_a_file_larger_than_the_memory_limit_is_prepared(tmp_path, demo_tokenizer_dir):
    """The process may allocate 96 MiB beyond what it holds after a warm-up; the data file is 40 MiB, which a
    reader holding the file (its bytes, its text, its parsed records) could not hold."""
    line = (
        json.dumps({"text": "The quick brown fox jumps over the lazy dog near the river bank. " * 6}) + "\n"
    )
    big = tmp_path / "big.jsonl"
    with open(big, "w") as handle:
        for _ in range(40 * 2**20 // len(line) + 1):
            handle.write(line)
    assert big.stat().st_size > 40 * 2**20
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "warm up " * 50}] * 200)
    env = {
        **os.environ,
        "LMFLOW_CACHE": str(tmp_path / "cache"),
        "ARROW_DEFAULT_MEMORY_POOL": "system",  # allocations the limit sees as they happen
        "MALLOC_ARENA_MAX": "2",  # glibc's per-thread arenas reserve 64 MiB of address space each
    }
    args = [
        sys.executable,
        "-c",
        MEMORY_LIMITED,
        str(demo_tokenizer_dir),
        str(big),
        str(small),
        str(96 * 2**20),
    ]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["records"] == big.stat().st_size // len(line) and result["examples"] > 0
