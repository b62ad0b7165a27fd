"""Nothing a user owns is ever deleted: an output directory is an lmflow run only if its run record says so,
``--overwrite`` removes only what the run wrote, and no input may live inside the output directory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from helpers import invoke
from test_run import assert_clean_failure

from lmflow_core import hookimpl, run


def tiny_run(model: Path, data: Path, out: Path, **settings) -> dict:
    """Settings of a short run of the tiny model on the chat data into ``out``."""
    return dict(
        model=str(model), dataset=str(data), template="chatml", output_dir=str(out), batch_size=4, **settings
    )


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with the sha256 of its content (directories: '<dir>')."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_a_foreign_directory_with_run_like_names_survives_overwrite(runner, fast_run_args, tmp_path):
    """The issue's repro: one entry matching checkpoint-* made lmflow take (and delete) a user's directory."""
    foreign = tmp_path / "foreign"
    (foreign / "photos").mkdir(parents=True)
    (foreign / "photos" / "cat.jpg").write_bytes(os.urandom(64))
    (foreign / "thesis.tex").write_text("precious")
    (foreign / "checkpoint-list.txt").write_text("x")
    (foreign / "checkpoint-7").mkdir()  # even a directory named like a checkpoint
    (foreign / "checkpoint-7" / "notes.md").write_text("mine")
    before = tree_hashes(foreign)
    args = [*fast_run_args, "--output-dir", foreign]  # the last --output-dir wins
    assert_clean_failure(invoke(runner, *args), 2, "does not hold an lmflow run", "lmflow_run.json")
    assert_clean_failure(invoke(runner, *args, "--overwrite"), 2, "does not hold an lmflow run")
    assert_clean_failure(invoke(runner, *args, "--resume"), 2, "does not hold an lmflow run")
    assert tree_hashes(foreign) == before


def test_overwrite_refuses_and_names_files_it_did_not_write(runner, fast_run_args, tmp_path):
    out = tmp_path / "out"
    assert invoke(runner, *fast_run_args).exit_code == 0
    record = json.loads((out / "lmflow_run.json").read_text())
    assert "model.safetensors" in record["outputs"] and "tokenizer.json" in record["outputs"]
    # A user's files beside the run, with names lmflow could have used.
    (out / "checkpoint-list.txt").write_text("x")
    (out / "checkpoint-notes").mkdir()
    (out / "checkpoint-notes" / "a.txt").write_text("a")
    (out / ".staging-mine").write_text("mine")
    (out / "model.safetensors.bak").write_bytes(b"backup")
    (out / "thesis.tex").write_text("precious")
    before = tree_hashes(out)
    result = invoke(runner, *fast_run_args, "--overwrite")
    assert_clean_failure(
        result,
        2,
        "holds files lmflow did not write (.staging-mine, checkpoint-list.txt, checkpoint-notes, "
        "model.safetensors.bak, thesis.tex)",
        "nothing was deleted",
    )
    assert tree_hashes(out) == before

    for name in ("checkpoint-list.txt", ".staging-mine", "model.safetensors.bak", "thesis.tex"):
        (out / name).unlink()
    (out / "checkpoint-notes" / "a.txt").unlink()
    (out / "checkpoint-notes").rmdir()
    inode = out.stat().st_ino
    assert invoke(runner, *fast_run_args, "--overwrite").exit_code == 0
    assert out.stat().st_ino == inode  # entries were replaced, the directory itself was never removed
    assert json.loads((out / "lmflow_run.json").read_text())["status"] == "completed"


class _MetricsWriter:
    """A plugin that writes a file into the output directory at every step (like a metrics logger)."""

    @hookimpl
    def on_step(self, step):
        if step.is_main_process:
            with open(Path(step.output_dir) / "metrics.csv", "a") as handle:
                handle.write(f"{step.global_step},{step.loss}\n")


def test_what_a_plugin_wrote_is_the_runs_and_is_replaced_by_overwrite(tiny_llama, chat_data, tmp_path):
    out = tmp_path / "out"
    settings = tiny_run(tiny_llama, chat_data, out, max_steps=2, save_steps=0)
    run(**settings, extra_plugins={"metrics": _MetricsWriter()})
    assert "metrics.csv" in json.loads((out / "lmflow_run.json").read_text())["outputs"]
    assert len((out / "metrics.csv").read_text().splitlines()) == 2
    run(**settings, overwrite=True, extra_plugins={"metrics": _MetricsWriter()})
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # replaced, not appended to

    # Without the plugin the file is still the earlier run's: --overwrite removes it.
    run(**settings, overwrite=True)
    assert not (out / "metrics.csv").exists()


def test_a_run_recorded_before_outputs_were_listed_is_still_overwritten(runner, fast_run_args, tmp_path):
    out = tmp_path / "out"
    assert invoke(runner, *fast_run_args).exit_code == 0
    record = json.loads((out / "lmflow_run.json").read_text())
    del record["outputs"]
    (out / "lmflow_run.json").write_text(json.dumps(record))
    assert invoke(runner, *fast_run_args, "--overwrite").exit_code == 0
    (out / "notes.txt").write_text("mine")
    record = json.loads((out / "lmflow_run.json").read_text())
    del record["outputs"]
    (out / "lmflow_run.json").write_text(json.dumps(record))
    assert_clean_failure(invoke(runner, *fast_run_args, "--overwrite"), 2, "did not write (notes.txt)")
    assert (out / "notes.txt").read_text() == "mine"


def _place_inside(option: str, out: Path, chat_data: Path) -> Path:
    """Put an input for ``option`` inside the earlier run's directory ``out``; return its path."""
    import shutil

    if option in ("--dataset", "--eval-dataset"):
        return Path(shutil.copy(chat_data, out / f"{option[2:]}.json"))
    if option == "--config":
        (out / "run.yaml").write_text("learning_rate: 0.001\n")
        return out / "run.yaml"
    if option == "--template":
        (out / "t.yaml").write_text('name: mine\nuser: "U: {content}\\n"\nassistant: "A: {content}\\n"\n')
        return out / "t.yaml"
    # --model: training further from the earlier run's own weights; --tokenizer: a checkpoint's tokenizer.
    return out if option == "--model" else out / "checkpoint-2"


@pytest.mark.parametrize(
    "option", ["--dataset", "--eval-dataset", "--config", "--model", "--tokenizer", "--template"]
)
def test_an_input_inside_the_output_directory_is_refused_and_kept(
    runner, fast_run_args, chat_data, tmp_path, model_loads, option
):
    out = tmp_path / "out"
    assert invoke(runner, *fast_run_args).exit_code == 0
    model_loads.clear()
    path = _place_inside(option, out, chat_data)
    before = tree_hashes(out)
    for extra in ([], ["--overwrite"], ["--resume"]):
        result = invoke(runner, *fast_run_args, option, path, *extra)
        assert_clean_failure(result, 2, f"{option} {path} lies inside --output-dir", "Move it out")
    assert tree_hashes(out) == before
    assert model_loads == []


def test_a_config_file_inside_the_output_directory_is_refused_from_python(tiny_llama, chat_data, tmp_path):
    from lmflow_core.errors import ConfigError

    out = tmp_path / "out"
    out.mkdir()
    config = out / "run.yaml"
    config.write_text(f"model: {tiny_llama}\ndataset: {chat_data}\ntemplate: chatml\noutput_dir: {out}\n")
    with pytest.raises(ConfigError, match="--config .* lies inside --output-dir"):
        run(str(config))
    assert config.is_file()


def test_checkpoint_rotation_deletes_only_checkpoints(tiny_llama, chat_data, tmp_path):
    """A user's copy named like a checkpoint (checkpoint-1-good) survives --save-total-limit's rotation."""
    import shutil

    out = tmp_path / "out"
    settings = tiny_run(tiny_llama, chat_data, out, save_steps=1, save_total_limit=1)
    run(**settings, max_steps=1)
    shutil.copytree(out / "checkpoint-1", out / "checkpoint-1-good")
    before = tree_hashes(out / "checkpoint-1-good")
    run(**settings, max_steps=3, resume="latest")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1-good", "checkpoint-3"]
    assert tree_hashes(out / "checkpoint-1-good") == before


def test_the_final_save_never_replaces_a_users_file_of_the_same_name(
    tiny_llama, chat_data, tmp_path, monkeypatch
):
    from lmflow_core.errors import LmflowError
    from lmflow_core.trainer import LmflowTrainer

    out = tmp_path / "out"
    settings = tiny_run(tiny_llama, chat_data, out, save_steps=1)
    run(**settings, max_steps=1)
    # A user's README.md beside the run, and a save that writes one too (as peft's adapter save does).
    (out / "README.md").write_text("my notes")
    real_save = LmflowTrainer.save_model

    def save_with_card(self, output_dir=None, *args, **kwargs):
        real_save(self, output_dir, *args, **kwargs)
        (Path(output_dir) / "README.md").write_text("model card")

    monkeypatch.setattr(LmflowTrainer, "save_model", save_with_card)
    with pytest.raises(LmflowError, match=r"README\.md there is not lmflow's.*--resume"):
        run(**settings, max_steps=2, resume="latest")
    assert (out / "README.md").read_text() == "my notes"
    assert (out / ".staging-final" / "README.md").read_text() == "model card"
