"""The lm_eval plugin: lm-evaluation-harness tasks scored on lmflow's models, by `lmflow lm-eval`, from Python and
at the end of a run, on the tiny local task in tests/data/lm_eval ("The opposite of hot is" -> cold, slow,
closed or low): a trained model beats its untrained base, the numbers are lm-eval's own CLI's, a LoRA run is
scored as its adapter, and every mistake is one line before anything loads."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import REPO, assert_one_line_error, invoke, plugin_commands, write_json

pytest.importorskip("lm_eval")

import lmflow_plugins.lm_eval as lm_eval_plugin  # noqa: E402
from lmflow_plugins.lm_eval import harness, lm_eval_model  # noqa: E402

from lmflow_core import ConfigError, read_json, run  # noqa: E402

TASK = "lmflow_opposites"
TASK_SOURCE = REPO / "tests" / "data" / "lm_eval"
METRICS = ("acc", "acc_norm", "brier_score")


def task_folder(where: Path) -> Path:
    """A copy of the shipped task with its data_files absolute (lm-eval reads a relative one from the cwd)."""
    data = TASK_SOURCE / "opposites.jsonl"
    text = (TASK_SOURCE / "opposites.yaml").read_text(encoding="utf-8")
    (where / "opposites.yaml").write_text(text.replace("test: opposites.jsonl", f"test: {data}"))
    return where


def facts() -> list[dict]:
    """The task's answers as training text: "The opposite of hot is cold.", once each."""
    rows = [json.loads(line) for line in (TASK_SOURCE / "opposites.jsonl").read_text().splitlines()]
    return [{"text": f"The opposite of {r['word']} is {r['choices'][r['label']]}."} for r in rows]


def scores(report: dict) -> dict[str, float]:
    """The task's figures in an lm-eval results dict (``acc,none`` -> ``acc``)."""
    values = report["results"][TASK]
    return {metric: values[f"{metric},none"] for metric in METRICS}


@pytest.fixture(scope="module", autouse=True)
def lm_eval_command():
    """`lmflow lm-eval` in the CLI that ``invoke`` runs."""
    yield from plugin_commands(lm_eval_plugin, "lm-eval")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return task_folder(tmp_path_factory.mktemp("lm-eval-tasks"))


@pytest.fixture(scope="module")
def harness_cli(tiny_llama, tasks, tmp_path_factory):
    """lm-eval's own CLI on the untrained tiny Llama, started in the background as soon as a test of this module
    needs it (it indexes lm-eval's thousands of tasks for ~15 s first); ``.result()`` waits for its JSON."""
    out = tmp_path_factory.mktemp("harness-cli")
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={tiny_llama},dtype=float32",
        "--tasks",
        TASK,
        "--include_path",
        str(tasks),
        "--batch_size",
        "8",
        "--device",
        "cpu",
        "--output_path",
        str(out),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    class Pending:
        def result(self) -> dict:
            output, _ = process.communicate(timeout=300)
            assert process.returncode == 0, output[-3000:]
            (found,) = out.rglob("results_*.json")
            return json.loads(found.read_text())

    yield Pending()
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def trained(tiny_llama, tasks, harness_cli, tmp_path_factory):
    """The tiny Llama fine-tuned by `lmflow run` on the facts, scored at the end by --plugins lm_eval:
    ``(output directory, printed output)``."""
    tmp = tmp_path_factory.mktemp("lm-eval-run")
    data = write_json(tmp / "facts.json", {"type": "text_only", "instances": facts()})
    out = tmp / "out"
    result = invoke(
        CliRunner(),
        "run",
        "--model",
        tiny_llama,
        "--dataset",
        data,
        "--output-dir",
        out,
        "--no-group-texts",  # one fact per example, all 12 in every batch
        "--batch-size",
        12,
        "--max-steps",
        100,
        "--learning-rate",
        3e-2,
        "--save-steps",
        0,
        "--plugins",
        "lm_eval",
        "--lm-eval-tasks",
        TASK,
        "--lm-eval-include-path",
        tasks,
    )
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def base_report(tiny_llama, tasks, tmp_path_factory) -> dict:
    """`lmflow lm-eval` on the untrained tiny Llama: its JSON report."""
    output = tmp_path_factory.mktemp("base-report") / "report.json"
    result = invoke(
        CliRunner(), "lm-eval", tiny_llama, "--tasks", TASK, "--include-path", tasks, "--output", output
    )
    assert result.exit_code == 0, result.output
    assert f"|{TASK}|" in result.output.replace(" ", "") and f"report: {output}" in result.output
    return json.loads(output.read_text())


# --------------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------------


def test_a_run_with_the_plugin_records_the_scores_and_prints_them(trained):
    out, printed = trained
    metrics = read_json(out / "lmflow_run.json")["result"]["eval"]
    assert set(metrics) == {f"lm_eval/{TASK}/{m}" for m in METRICS}
    assert f"eval: lm_eval/{TASK}/acc {metrics[f'lm_eval/{TASK}/acc']:.4f}" in printed
    assert "nll_per_sample" not in metrics  # no --eval-dataset: the core's NLL has nothing to score


def test_the_trained_model_scores_above_its_untrained_base(trained, tasks, base_report, runner, tmp_path):
    out, _ = trained
    result = invoke(
        runner, "lm-eval", out, "--tasks", TASK, "--include-path", tasks, "--output", tmp_path / "r.json"
    )
    assert result.exit_code == 0, result.output
    after, before = scores(read_json(tmp_path / "r.json")), scores(base_report)
    print(f"untrained {before}, trained {after}")
    assert before["acc"] <= 0.5 and after["acc"] >= 0.9
    assert after["brier_score"] < before["brier_score"] - 0.3
    # Scored in memory at the end of the run or from the saved directory: the same numbers.
    recorded = read_json(out / "lmflow_run.json")["result"]["eval"]
    assert {m: recorded[f"lm_eval/{TASK}/{m}"] for m in METRICS} == pytest.approx(after, abs=1e-6)


def test_the_scores_equal_lm_evals_own_cli_on_the_same_model_directory(base_report, harness_cli):
    theirs = harness_cli.result()
    print(f"lmflow lm-eval {scores(base_report)}, lm-eval's CLI {scores(theirs)}")
    assert scores(base_report) == pytest.approx(scores(theirs), abs=1e-6)
    assert base_report["n-samples"][TASK] == theirs["n-samples"][TASK]
    assert base_report["metrics"] == {f"lm_eval/{TASK}/{m}": v for m, v in scores(theirs).items()}


def test_a_lora_run_is_scored_as_its_adapter(tiny_llama, tasks, tmp_path):
    data = write_json(tmp_path / "facts.json", {"type": "text_only", "instances": facts()})
    result = run(
        model=str(tiny_llama),
        dataset=str(data),
        output_dir=str(tmp_path / "adapter"),
        group_texts=False,
        batch_size=12,
        max_steps=60,
        learning_rate=2e-2,
        save_steps=0,
        plugins=["lora", "lm_eval"],
        # Adapters alone barely move a random tiny model; its embeddings trained in full (saved with the
        # adapter) let the run learn the facts in seconds.
        lora={"modules_to_save": "lm_head,embed_tokens"},
        lm_eval={"tasks": [TASK], "include_path": str(tasks), "limit": 8},
    )
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    # `lmflow lm-eval` from Python on the adapter directory (applied to its base as it loads).
    adapter = lm_eval_model(tmp_path / "adapter", TASK, include_path=tasks, limit=8)
    base = lm_eval_model(tiny_llama, TASK, include_path=tasks, limit=8)
    assert adapter["n-samples"][TASK]["effective"] == 8
    assert set(result.eval_metrics) == {f"lm_eval/{TASK}/{m}" for m in METRICS}
    assert result.eval_metrics == pytest.approx(adapter["metrics"], abs=1e-6)
    brier = f"lm_eval/{TASK}/brier_score"
    print(f"LoRA run {result.eval_metrics}, base {base['metrics']}")
    assert result.eval_metrics[brier] < base["metrics"][brier] - 0.1  # the adapter was scored, not the base


def test_tasks_are_named_as_in_lm_evals_cli_by_name_glob_or_yaml_file(tasks):
    assert harness.check_tasks("lmflow_opp*", tasks).names == [TASK]
    by_file = harness.check_tasks(f"{tasks / 'opposites.yaml'},{TASK}", tasks)
    assert by_file.names == [str(tasks / "opposites.yaml"), TASK] and not by_file.online
    assert by_file.objects[0].task_name == TASK  # the task the file defines, its data read


def test_metric_names_carry_the_task_the_metric_and_a_filter_other_than_none():
    results = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.1,
            },
            "arc_easy": {"acc,none": 0.5, "acc_stderr,none": "N/A", "sample_len": 10, "name": "arc_easy"},
        }
    }
    assert harness.metrics_of(results) == {
        "lm_eval/gsm8k/exact_match/strict-match": 0.25,
        "lm_eval/arc_easy/acc": 0.5,
    }


# --------------------------------------------------------------------------------------------------------------
# Mistakes: one line, before the model loads
# --------------------------------------------------------------------------------------------------------------


def test_without_lm_eval_installed_the_command_and_the_plugin_say_how_to_install_it(
    tiny_llama, tasks, runner, monkeypatch, model_loads, tmp_path
):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
    result = invoke(runner, "lm-eval", tiny_llama, "--tasks", TASK, "--include-path", tasks)
    assert_one_line_error(result, "lm-eval is not installed; pip install 'lmflow[lm-eval]'")
    with pytest.raises(ConfigError, match=r"lm-eval is not installed; pip install 'lmflow\[lm-eval\]'"):
        run(
            model=str(tiny_llama),
            dataset=str(write_json(tmp_path / "f.json", {"type": "text_only", "instances": facts()})),
            output_dir=str(tmp_path / "out"),
            plugins=["lm_eval"],
            lm_eval={"tasks": TASK},
        )
    assert model_loads == [] and not (tmp_path / "out").exists()


def test_a_run_without_tasks_is_refused_before_it_trains(tiny_llama, tmp_path, model_loads):
    with pytest.raises(ConfigError, match="no lm-eval task given. Pass --lm-eval-tasks"):
        run(
            model=str(tiny_llama),
            dataset=str(write_json(tmp_path / "f.json", {"type": "text_only", "instances": facts()})),
            output_dir=str(tmp_path / "out"),
            plugins=["lm_eval"],
        )
    assert model_loads == []


def test_an_unknown_task_names_close_ones_and_how_to_add_your_own(
    tiny_llama, tasks, runner, monkeypatch, model_loads
):
    from lm_eval.tasks import TaskManager

    # lm-eval's own index (thousands of tasks, ~15 s to build) stands in as the shipped task alone.
    monkeypatch.setattr(
        harness,
        "_full_task_manager",
        lambda folder: TaskManager(include_path=str(tasks), include_defaults=False),
    )
    result = invoke(runner, "lm-eval", tiny_llama, "--tasks", "lmflow_oposites", "--include-path", tasks)
    assert_one_line_error(
        result, "lm-eval has no task 'lmflow_oposites' (did you mean lmflow_opposites?)", "--include-path DIR"
    )
    result = invoke(
        runner, "lm-eval", tiny_llama, "--tasks", TASK, "--include-path", tasks / "opposites.yaml"
    )
    assert_one_line_error(result, "is not a folder")
    assert model_loads == []


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_a_task_whose_data_is_on_the_hub_fails_at_once_offline_or_when_the_hub_is_unreachable(
    hub, tiny_llama, runner, monkeypatch, model_loads, tmp_path
):
    import datasets.config
    from huggingface_hub import constants

    (tmp_path / "hub.yaml").write_text(
        "task: lmflow_hub_task\ndataset_path: lmflow-tests/no-such-dataset\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n"
    )
    if hub == "unreachable":  # online, with the hub's address a closed local port
        from lmflow_core import free_port

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
        for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_DATASETS_OFFLINE"):
            monkeypatch.delenv(variable, raising=False)
    started = time.monotonic()
    result = invoke(runner, "lm-eval", tiny_llama, "--tasks", "lmflow_hub_task", "--include-path", tmp_path)
    elapsed = time.monotonic() - started
    why = "HF_HUB_OFFLINE is set" if hub == "offline" else "the Hugging Face hub cannot be reached"
    assert_one_line_error(
        result,
        "the lm-eval task 'lmflow_hub_task' needs its data from the Hugging Face hub "
        f"(dataset lmflow-tests/no-such-dataset), which is not on this machine, and {why}",
        "Download it first",
        "use a local task",
    )
    assert elapsed < 10 and model_loads == []
