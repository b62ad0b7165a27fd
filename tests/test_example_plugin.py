"""The separately installable example plugin: pip install it, then `lmflow run --plugins csv_logger`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

EXAMPLE = REPO / "examples" / "lmflow-csv-logger"


LMFLOW = Path(sys.executable).with_name("lmflow")  # the console script of this environment


@pytest.fixture(scope="module")
def installed_example():
    """pip install the example package, as a user would; uninstall it after unless it was there before."""
    pip = [sys.executable, "-m", "pip"]
    present = (
        subprocess.run([*pip, "show", "--quiet", "lmflow-csv-logger"], capture_output=True).returncode == 0
    )
    subprocess.run(
        [*pip, "install", "--quiet", "--no-deps", "--no-build-isolation", str(EXAMPLE)], check=True
    )
    try:
        yield
    finally:
        if not present:
            subprocess.run([*pip, "uninstall", "--quiet", "--yes", "lmflow-csv-logger"], check=True)


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
