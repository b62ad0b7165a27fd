"""lm-evaluation-harness (plugin ``lm_eval``): score a model on lm-eval's tasks, or tasks of your own, in
lmflow's process, on the model as lmflow loads it (LoRA adapters included).

    lmflow lm-eval MODEL --tasks hellaswag,arc_easy [--include-path DIR] [--limit N] [--num-fewshot K]
    lmflow run ... --plugins lm_eval --lm-eval-tasks arc_easy      # the trained model, at the end of the run

The run path goes through the ``evaluate`` hook: the metrics, named ``lm_eval/<task>/<metric>``, land in the run
record (``lmflow_run.json``) and the summary with the others. Needs the ``lm-eval`` package
(``pip install 'lmflow[lm-eval]'``), imported only when a task runs. How task data meets the network: see
``harness.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmflow_core import LmflowError, PluginOption, StashKey, hookimpl, note

from . import commands
from .harness import INSTALL_PROBLEM, TaskPlan, check_tasks, metrics_of, parse_tasks, run_tasks, table_of

if TYPE_CHECKING:
    import click

    from lmflow_core import RunConfig

__all__ = [
    "INSTALL_PROBLEM",
    "NAME",
    "TaskPlan",
    "check_tasks",
    "default_output",
    "lm_eval_model",
    "metrics_of",
    "run_tasks",
    "table_of",
]

NAME = "lm_eval"
# The tasks a run checked before training, for the evaluate hook at its end.
PLAN = StashKey["TaskPlan"]()


# --------------------------------------------------------------------------------------------------------------
# From Python and the command line
# --------------------------------------------------------------------------------------------------------------


def lm_eval_model(
    model: str | os.PathLike,
    tasks: str | Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    plugins: Sequence[str] = (),
    plugin_options: dict[str, dict[str, Any]] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Score ``model`` (a model directory, a LoRA adapter directory or a hub id) on lm-eval ``tasks``.

    The model loads as ``lmflow generate`` loads it (the loading hooks of ``plugins``, an adapter on its base),
    and runs in this process through lm-eval's ``HFLM``. The tasks are checked, and their data read, before the
    model loads.

    Args:
        tasks: ``"a,b"`` or a list: lm-eval task, group or tag names, globs (``mmlu_*``), or task YAML files.
        include_path: a folder of task YAML files of your own.
        limit: examples per task (below 1: a fraction of each task); for quick checks.
        num_fewshot: examples in each prompt (default: the task's own).
        batch_size: requests per forward pass.
        device, dtype: as for ``lmflow generate`` (``auto``: a GPU if there is one; bfloat16 there, else float32).

    Returns:
        lm-eval's results (``results``, ``groups``, ``configs``, ``versions``, ``n-shot``, ``n-samples``,
        ``config``...) as JSON-ready data, with ``model``, ``tasks``, ``seconds`` and ``metrics``: the scores
        under lmflow's names, ``{"lm_eval/<task>/<metric>": value}`` (``/<filter>`` added for a filter other
        than ``none``).

    Raises:
        LmflowError: lm-eval not installed, an unknown task, task data that needs the hub while it cannot be
            reached (or ``HF_HUB_OFFLINE`` is set), a missing model; each as one line naming the fix.
    """
    from lmflow_core import open_session, quiet_libraries

    from .harness import json_ready

    plan = check_tasks(tasks, include_path)
    quiet_libraries()
    session = open_session(
        str(model),
        plugins=list(plugins),
        plugin_options=plugin_options,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    started = time.monotonic()
    results = run_tasks(
        session.model, session.tokenizer, plan, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size
    )
    return {
        "model": str(model),
        "tasks": plan.names,
        "seconds": round(time.monotonic() - started, 3),
        "metrics": metrics_of(results),
        **json_ready(results),
    }


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``lmflow lm-eval``."""
    commands.add_commands(cli)


# --------------------------------------------------------------------------------------------------------------
# During a run: the evaluate hook
# --------------------------------------------------------------------------------------------------------------


@hookimpl
def declare_options() -> list[PluginOption]:
    """``--lm-eval-tasks`` and the rest (``lm_eval:`` section of a YAML run config)."""
    return [
        PluginOption(
            "tasks",
            list,
            [],
            "lm-eval tasks to score the trained model on, comma-separated (names, globs or task YAML files).",
            parse=parse_tasks,
            metavar="TASK[,TASK...]",
        ),
        PluginOption("include_path", str, None, "A folder of task YAML files of your own."),
        PluginOption(
            "limit",
            float,
            None,
            "Score only the first N examples of each task (below 1: a fraction of each).",
            min_exclusive=0,
        ),
        PluginOption("num_fewshot", int, None, "Examples in each prompt (default: the task's own).", min=0),
        PluginOption("batch_size", int, 8, "Requests per forward pass.", min=1),
    ]


@hookimpl
def validate_config(config: RunConfig) -> list[str]:
    """Before anything loads: lm-eval installed, the tasks known and their data on this machine (or the hub
    reachable), so that a misspelled task is not found after hours of training."""
    options = config.options_for(NAME)
    try:
        config.stash[PLAN] = check_tasks(
            options.tasks,
            options.include_path,
            tasks_flag="--lm-eval-tasks",
            include_flag="--lm-eval-include-path",
        )
    except LmflowError as exc:
        return [exc.one_line()]
    return []


@hookimpl
def evaluate(config: RunConfig, model: Any, tokenizer: Any) -> dict[str, float] | None:
    """Score the model in memory (the trained one at the end of a run, a PEFT model as it is) on the tasks."""
    options = config.options_for(NAME)
    if _world_size() > 1:
        note(
            "lm_eval: not run in a multi-process run (lm-eval scores one process's model); score the saved model "
            f"with `lmflow lm-eval {config.output_dir} --tasks {','.join(options.tasks)}`"
        )
        return None
    plan = config.stash.get(PLAN, None)
    if plan is None:
        plan = check_tasks(options.tasks, options.include_path)
    results = run_tasks(
        model,
        tokenizer,
        plan,
        limit=options.limit,
        num_fewshot=options.num_fewshot,
        batch_size=options.batch_size,
    )
    if PLAN in config.stash:  # the tasks' objects were used (few-shot settings applied): not again
        del config.stash[PLAN]
    return metrics_of(results)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def default_output(model: str) -> Path:
    """``lm-eval-<model folder name>.json`` in the working directory."""
    name = Path(str(model).rstrip("/\\")).name or "model"
    return Path(f"lm-eval-{name}.json")
