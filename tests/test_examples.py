"""The separately installable example plugins: pip install each, then use it from `lmflow run`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, pip_installed

LMFLOW = Path(sys.executable).with_name("lmflow")  # the console script of this environment


def installed(package: str):
    """pip install examples/<package>, as a user would (see :func:`helpers.pip_installed`)."""
    return pip_installed(REPO / "examples" / package, package)


@pytest.fixture(scope="module")
def installed_example():
    with installed("lmflow-csv-logger"):
        yield


def lmflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LMFLOW), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_installed_plugin_is_listed_and_its_hook_runs(installed_example, tiny_llama, chat_data, tmp_path):
    listing = json.loads(lmflow("plugins", "--json").stdout)
    row = next(r for r in listing if r["name"] == "csv_logger")
    assert row["source"] == "installed package lmflow-csv-logger" and row["version"] == "0.1.0"
    assert row["hooks"] == ["declare_options", "on_step", "validate_config"]

    help_text = lmflow("run", "--plugins", "csv_logger", "--help").stdout
    assert "--csv-logger-path" in help_text and "--csv-logger-every" in help_text

    out = tmp_path / "out"
    result = lmflow(
        "run",
        "--plugins",
        "csv_logger",
        "--model",
        tiny_llama,
        "--dataset",
        chat_data,
        "--template",
        "chatml",
        "--output-dir",
        out,
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--csv-logger-every",
        "2",
        "--save-steps",
        "100",
    )
    assert result.returncode == 0, result.stderr
    assert "plugins: csv_logger 0.1.0" in result.stdout
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert all(float(r["loss"]) > 0 for r in rows)

    bad = lmflow(
        "run",
        "--plugins",
        "csv_logger",
        "--model",
        tiny_llama,
        "--dataset",
        chat_data,
        "--template",
        "chatml",
        "--output-dir",
        tmp_path / "o2",
        "--csv-logger-path",
        tmp_path,
    )
    assert bad.returncode == 2 and bad.stderr.strip().endswith("is a directory; give a file name")


@pytest.mark.slow
def test_an_installed_template_plugin_trains_with_its_template(tiny_llama, chat_data, tmp_path):
    with installed("lmflow-acme-template"):
        listed = lmflow("templates", "list").stdout
        assert "acme" in listed and "ACME in-house chat format" in listed
        shown = lmflow("templates", "show", "acme").stdout
        assert "<|acme:assistant|>[[2 plus 2 is 4.<|acme:end|>]]" in shown
        out = tmp_path / "out"
        result = lmflow(
            "run",
            "--model",
            tiny_llama,
            "--dataset",
            chat_data,
            "--template",
            "acme",
            "--output-dir",
            out,
            "--max-steps",
            "2",
            "--save-steps",
            "0",
        )
        assert result.returncode == 0, result.stderr
        assert "template: acme" in result.stdout
        record = json.loads((out / "lmflow_run.json").read_text())
        assert record["template"] == "acme"

    from transformers import AutoTokenizer

    # The trained model carries the format even where the plugin is not installed.
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|acme:user|>Hi<|acme:end|>\n<|acme:assistant|>")
