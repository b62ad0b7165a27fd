"""Reading user files: only regular files (no pipes, no devices), size and nesting limits, gzipped and
upper-case data files, notes for what a dataset directory holds besides data, and the block size and truncation
counts that `lmflow data check` and `lmflow run` report."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import time
from contextlib import contextmanager

import pytest
from helpers import conversations, invoke, write_json

from lmflow_core.catalog import get_template
from lmflow_core.config import load_config_file
from lmflow_core.data import load_raw_dataset, tokenize_dataset
from lmflow_core.errors import ConfigError, DataError, LmflowError
from lmflow_core.report import Reporter
from lmflow_core.templates import Conversation, TemplateError

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux (pipes, /proc)")


class Hung(BaseException):
    """Raised by the alarm when a call blocks; a BaseException, so the CLI's error reporting lets it through."""


@contextmanager
def must_return_within(seconds: float, memory: int = 2**30):
    """Fail, instead of hanging the test run or exhausting the machine's memory, when the block blocks for
    ``seconds`` (an alarm interrupts a blocking open or read of a pipe) or allocates more than ``memory`` bytes
    (as reading /dev/zero to its end would)."""
    import resource

    def alarm(*_):
        raise Hung(f"still running after {seconds} s")

    with open("/proc/self/statm") as handle:
        used = int(handle.read().split()[0]) * resource.getpagesize()
    limits = resource.getrlimit(resource.RLIMIT_AS)
    cap = used + memory if limits[0] == resource.RLIM_INFINITY else min(limits[0], used + memory)
    resource.setrlimit(resource.RLIMIT_AS, (cap, limits[1]))
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, limits)


def fifo(path):
    os.mkfifo(path)
    return path


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code != 0, result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    return result.stderr


# ---- pipes and devices -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["data check", "run"])
def test_a_fifo_dataset_is_refused_at_once(runner, tmp_path, command):
    # Imported up front: the seconds counted are the refusal's, not the libraries' imports.
    import datasets  # noqa: F401
    import transformers.trainer  # noqa: F401

    import lmflow_core.train  # noqa: F401
    import lmflow_core.trainer  # noqa: F401

    path = fifo(tmp_path / "data.json")
    args = [*command.split(), path]
    if command == "run":
        args = ["run", "--dataset", path, "--template", "chatml", "--output-dir", tmp_path / "out"]
    start = time.monotonic()
    with must_return_within(10):
        result = invoke(runner, *args)
    elapsed = time.monotonic() - start
    one_line_error(result, f"dataset {path} is a named pipe (FIFO), not a regular file")
    assert result.exit_code == 2
    assert elapsed < 5.0, (
        f"refused after {elapsed:.2f} s"
    )  # a hang is forever; 5 s leaves room for a busy machine
    assert not (tmp_path / "out").exists()


def test_a_symlink_to_dev_zero_is_refused_and_a_symlink_to_a_file_is_read(runner, tmp_path):
    zero = tmp_path / "x.json"
    zero.symlink_to("/dev/zero")
    with must_return_within(10):
        result = invoke(runner, "data", "check", zero)
    one_line_error(result, f"dataset {zero} is a character device (a symlink to /dev/zero)")
    # In a directory too.
    folder = tmp_path / "folder"
    folder.mkdir()
    write_json(folder / "a.json", [{"text": "fine"}])
    (folder / "b.json").symlink_to("/dev/zero")
    with must_return_within(10), pytest.raises(DataError, match=r"b\.json is a character device"):
        load_raw_dataset(folder)
    # A symlink to a regular file is fine.
    link = tmp_path / "link.json"
    link.symlink_to(folder / "a.json")
    assert load_raw_dataset(link).records == [{"text": "fine"}]


def test_a_pipe_swapped_in_after_the_stat_cannot_block_the_open(tmp_path, monkeypatch):
    from lmflow_core import inputs

    path = fifo(tmp_path / "raced.json")
    regular = os.stat(__file__)
    real_stat = os.stat
    monkeypatch.setattr(
        os, "stat", lambda p, *a, **k: regular if str(p) == str(path) else real_stat(p, *a, **k)
    )
    with must_return_within(5), pytest.raises(LmflowError, match="is a named pipe"):
        inputs.read_input_file(path, "dataset")


def test_config_messages_and_template_files_get_the_same_protection(runner, tmp_path):
    config = fifo(tmp_path / "run.yaml")
    messages = fifo(tmp_path / "messages.json")
    template = fifo(tmp_path / "template.yaml")
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    with must_return_within(10):
        with pytest.raises(ConfigError, match=r"config file .*run\.yaml is a named pipe"):
            load_config_file(config)
        with pytest.raises(ConfigError, match=r"config file .*zero\.yaml is a character device"):
            load_config_file(zero)
        with pytest.raises(LmflowError, match=r"--messages file .*messages\.json is a named pipe"):
            Conversation.from_file(messages)
        with pytest.raises(TemplateError, match=r"template file .*template\.yaml is a named pipe"):
            get_template(str(template))
        result = invoke(runner, "templates", "render", "chatml", "--messages", messages)
    one_line_error(result, "messages.json is a named pipe (FIFO), not a regular file")


# ---- size and nesting ----------------------------------------------------------------------------------------


def test_json_nested_100k_deep_is_a_one_line_error_naming_the_file_and_record(runner, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep.json"
    path.write_text(deep)
    result = invoke(runner, "data", "check", path)
    assert result.exit_code == 2
    one_line_error(result, f"{path}: record 0, line 1, column 501 nests JSON more than 500 levels deep")
    assert "RecursionError" not in result.stderr
    lines = tmp_path / "deep.jsonl"
    lines.write_text('{"text": "fine"}\n{"text": ' + deep + "}\n")
    with pytest.raises(DataError, match=r"deep\.jsonl: line 2, column 509 nests JSON"):
        load_raw_dataset(lines)
    lmflow = tmp_path / "deep_instances.json"
    lmflow.write_text(
        '{"type": "text_only", "instances": [{"text": "a"}, {"text": "[\\"", "x": ' + deep + "}]}"
    )
    with pytest.raises(DataError, match=r"deep_instances\.json: instance 1, line 1, column \d+ nests"):
        load_raw_dataset(lmflow)


def test_files_over_the_size_limit_are_refused_before_they_are_read(tmp_path, monkeypatch):
    from lmflow_core import inputs

    path = write_json(tmp_path / "big.json", [{"text": "x" * 2000}])
    monkeypatch.setattr("lmflow_core.data.formats.DATASET_FILE_LIMIT", 1000)
    with pytest.raises(DataError, match=r"dataset .*big\.json is 2\.0 KiB, more than the 1000 B .*Split it"):
        load_raw_dataset(path)
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 1\n" + "#" * 2000)
    monkeypatch.setattr(inputs, "SMALL_FILE_LIMIT", 1000)
    with pytest.raises(ConfigError, match=r"config file .*run\.yaml is 2\.0 KiB"):
        load_config_file(config)


# ---- what a dataset directory holds -----------------------------------------------------------------------------


def write_gzip(path, text: str):
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(text)
    return path


def test_upper_case_and_gzipped_files_are_read_and_other_files_named(runner, tmp_path):
    from lmflow_core.report import reporting

    write_json(tmp_path / "B.JSON", [{"text": "from B.JSON"}])
    write_gzip(tmp_path / "c.json.gz", json.dumps({"type": "text_only", "instances": [{"text": "from c"}]}))
    write_gzip(tmp_path / "d.jsonl.gz", '{"text": "from d 1"}\n{"text": "from d 2"}\n')
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / ".gitattributes").write_text("*.gz filter=lfs")
    shown = io.StringIO()
    with reporting(Reporter(stream=shown)):
        raw = load_raw_dataset(tmp_path)
    assert [r["text"] for r in raw.records] == ["from B.JSON", "from c", "from d 1", "from d 2"]
    assert [f.name for f in raw.files] == ["B.JSON", "c.json.gz", "d.jsonl.gz"]
    assert shown.getvalue() == (
        f"note: dataset directory {tmp_path}: notes.txt is not read "
        "(only .json, .jsonl, .json.gz and .jsonl.gz files are)\n"
    )
    result = invoke(runner, "data", "check", tmp_path)
    assert result.exit_code == 0, result.output
    assert "notes.txt is not read" in result.output and "(text_only, 3 files)" in result.output
    info = json.loads(invoke(runner, "data", "check", tmp_path, "--json").stdout)  # the note is on stderr
    assert info["records"] == 4


def test_a_gzip_bomb_and_a_broken_gzip_file_are_refused(tmp_path, monkeypatch):
    from lmflow_core import inputs

    bomb = write_gzip(tmp_path / "bomb.jsonl.gz", '{"text": "' + " " * 1_000_000 + '"}\n')
    assert bomb.stat().st_size < 5000
    monkeypatch.setattr(inputs, "GZIP_FLOOR", 100_000)
    with pytest.raises(DataError, match=r"bomb\.jsonl\.gz decompresses to more than .* possible gzip bomb"):
        load_raw_dataset(bomb)
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(gzip.compress(b'[{"text": "a"}]')[:-6])
    with pytest.raises(DataError, match=r"broken\.json\.gz is not a valid gzip file"):
        load_raw_dataset(broken)


# ---- block size and truncation ---------------------------------------------------------------------------------


def test_data_check_and_run_decide_the_same_block_size(runner, tmp_path):
    from lmflow_core.train import check_run, configure

    path = write_json(tmp_path / "chat.json", conversations(4))
    config, plugins = configure(dataset=str(path), template="chatml", output_dir=str(tmp_path / "out"))
    run_size = check_run(config, plugins).block_size
    check = invoke(runner, "data", "check", path, "--json")
    assert check.exit_code == 0, check.output
    assert json.loads(check.stdout)["block_size"] == run_size == 512  # the demo model's context


def test_an_example_longer_than_the_block_is_counted_once(runner, tmp_path):
    from transformers import AutoTokenizer

    from lmflow_core.demo import demo_model_dir

    chatml = get_template("chatml")
    records = [
        *conversations(2),
        {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]},
    ]
    path = write_json(tmp_path / "c.json", records)
    raw = load_raw_dataset(path, chatml)
    _, stats = tokenize_dataset(
        raw, AutoTokenizer.from_pretrained(demo_model_dir()), 40, chatml, use_cache=False
    )
    assert stats.truncated == 1 and stats.dropped_untrained == 1  # the same example: cut, then left untrained
    shown = io.StringIO()
    Reporter(stream=shown).data("train", raw, stats)
    assert (
        "note: 1 train example is longer than --block-size 40; raise it to keep it whole" in shown.getvalue()
    )
    result = invoke(runner, "data", "check", path, "--block-size", "40")
    assert "block size 40: 1 example would be truncated, 1 would have no trained token left" in result.output


def test_plugin_inputs_that_are_not_regular_files_are_refused(tmp_path):
    from lmflow_plugins.deepspeed_config import read_user_config
    from lmflow_plugins.vocab_extension import read_corpus

    path = fifo(tmp_path / "pipe.json")
    with must_return_within(5):
        with pytest.raises(ValueError, match=r"--zero3-config .*pipe.json is a named pipe \(FIFO\)"):
            read_user_config(str(path), "zero3")
        with pytest.raises(LmflowError, match=r"corpus file .*pipe.json is a named pipe \(FIFO\)"):
            read_corpus([path])
