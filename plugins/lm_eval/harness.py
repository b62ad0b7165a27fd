"""lm-evaluation-harness on a model that is already loaded: finding the tasks, reading their data without
surprises from the network, running ``lm_eval.simple_evaluate`` and naming the results as lmflow's metrics.

``lm_eval`` is imported only inside these functions, so lmflow starts (and works) without the extra.

Task data and the network. A task's data is read first with the Hugging Face libraries in offline mode: a task
over local files (``dataset_path: json`` with ``data_files``), or one whose data an earlier online run left in
the ``datasets`` cache, never contacts the hub. Only a task whose data is not on this machine needs the hub; one
short connection then tells whether it can be reached (a second or two, where the libraries would retry for
half a minute), and under ``HF_HUB_OFFLINE=1`` or without the hub the task is a one-line error saying to
download its data first or use a local task.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmflow_core import LmflowError, hub_offline, hub_offline_requested, hub_reachable

INSTALL_PROBLEM = "lm-eval is not installed; pip install 'lmflow[lm-eval]'"
PREFIX = "lm_eval"  # metric names: lm_eval/<task>/<metric>[/<filter>]
TASK_FILE_SUFFIXES = (".yaml", ".yml")


@dataclass
class TaskPlan:
    """Tasks checked and loaded (their data read), ready for :func:`run_tasks`.

    Attributes:
        names: the task names, globs expanded (a YAML file given by path keeps its path).
        objects: lm-eval's ``Task``/``Group`` objects, one per name, or a list of tasks for a tag.
        task_manager: the ``lm_eval.tasks.TaskManager`` that found them.
        online: whether their data needed the hub (then reachable); otherwise evaluation runs offline.
    """

    names: list[str]
    objects: list[Any] = field(repr=False)
    task_manager: Any = field(repr=False)
    online: bool = False


def import_lm_eval() -> Any:
    """The ``lm_eval`` package, or the one-line error saying how to install it."""
    try:
        import lm_eval
    except ImportError as exc:
        raise LmflowError(INSTALL_PROBLEM) from exc
    return lm_eval


def parse_tasks(value: str | Sequence[str] | None) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]``, blanks and repeats dropped, order kept."""
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [part for v in value for part in v.split(",")]
    else:
        raise LmflowError(f'tasks must be names ("a,b" or a list of strings), got {value!r}')
    names: list[str] = []
    for item in (item.strip() for item in items):
        if item and item not in names:
            names.append(item)
    return names


# --------------------------------------------------------------------------------------------------------------
# Finding and loading tasks
# --------------------------------------------------------------------------------------------------------------


def check_tasks(
    tasks: str | Sequence[str] | None,
    include_path: str | os.PathLike | None = None,
    *,
    tasks_flag: str = "--tasks",
    include_flag: str = "--include-path",
) -> TaskPlan:
    """Find ``tasks`` (lm-eval's own, those in ``include_path``, or YAML files) and read their data.

    Raises:
        LmflowError: lm-eval not installed; no task; an ``include_path`` that is not a folder; an unknown task
            (with close matches); a task whose data is not on this machine while the hub cannot be reached or
            ``HF_HUB_OFFLINE`` is set; a task that fails to load (its message, on one line).
    """
    import_lm_eval()
    names = parse_tasks(tasks)
    if not names:
        raise LmflowError("no lm-eval task given", f"pass {tasks_flag} NAME[,NAME...]")
    folder = None
    if include_path is not None:
        folder = Path(include_path).expanduser()
        if not folder.is_dir():
            raise LmflowError(
                f"{include_flag} {include_path} is not a folder",
                "give the folder that holds the task YAML files",
            )
        folder = folder.resolve()
    with quiet_lm_eval():
        manager, complete = _task_manager(names, folder)
        try:
            return _load(manager, names, include_flag, complete)
        except _NeedsAllTasks:
            # A task of the folder names one of lm-eval's (a group's member, an `include:`): load with all.
            return _load(_full_task_manager(folder), names, include_flag, True)


class _NeedsAllTasks(Exception):
    """A task found in the include folder alone failed to load: try again with lm-eval's tasks indexed too."""


def _task_manager(names: list[str], folder: Path | None) -> tuple[Any, bool]:
    """A TaskManager, and whether it indexes lm-eval's own tasks: only ``folder``'s when the names are all its
    tasks or YAML files (indexing lm-eval's thousands of tasks takes seconds), else lm-eval's and the folder's."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=str(folder) if folder else None, include_defaults=False)
    if all(_is_task_file(name) or _matches(local, name) for name in names):
        return local, False
    return _full_task_manager(folder), True


def _full_task_manager(folder: Path | None) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder) if folder else None)


def _is_task_file(name: str) -> bool:
    return name.endswith(TASK_FILE_SUFFIXES) and Path(name).expanduser().is_file()


def _matches(manager: Any, name: str) -> list[str]:
    """The registered names ``name`` stands for: itself, or what a glob (``mmlu_*``) matches."""
    if name in manager.all_tasks:
        return [name]
    if any(c in name for c in "*?["):
        return sorted(n for n in manager.all_tasks if fnmatch.fnmatchcase(n, name))
    return []


def _load(manager: Any, names: list[str], include_flag: str, complete: bool) -> TaskPlan:
    expanded: list[str] = []
    for name in names:
        if _is_task_file(name):
            found = [str(Path(name).expanduser().resolve())]
        else:
            found = _matches(manager, name)
        if not found:  # (only with lm-eval's own tasks indexed: the folder's alone were all found)
            raise _unknown_task(manager, name, include_flag)
        expanded += [n for n in found if n not in expanded]
    offline_env = hub_offline_requested()
    objects, online = [], False
    for name in expanded:
        try:
            with hub_offline():
                objects.append(_load_one(manager, name))
            continue
        except Exception as exc:
            if not _needs_network(exc):
                if not complete:
                    raise _NeedsAllTasks from exc
                raise _load_error(name, exc) from None
            problem = exc
        if offline_env or not hub_reachable():
            why = "HF_HUB_OFFLINE is set" if offline_env else "the Hugging Face hub cannot be reached"
            raise LmflowError(
                f"the lm-eval task {name!r} needs its data from the Hugging Face hub "
                f"({_dataset_of(problem)}), which is not on this machine, and {why}",
                "download it first where the hub is reachable (run the task once online), "
                f"or use a local task ({include_flag} DIR with a task YAML over local files)",
            ) from None
        try:
            objects.append(_load_one(manager, name))
        except Exception as exc:
            raise _load_error(name, exc) from None
        online = True
    return TaskPlan(expanded, objects, manager, online)


def _load_one(manager: Any, name: str) -> Any:
    """lm-eval's object for ``name``: a Task, a Group, or (a tag) a list of Tasks; their data is read here."""
    loaded = manager.load([name])
    tasks, groups = loaded["tasks"], loaded.get("groups") or {}
    if name in groups:
        return groups[name]
    if name in tasks:
        return tasks[name]
    if len(tasks) == 1 and not groups:  # a YAML file given by path: the task it defines
        return next(iter(tasks.values()))
    return list(tasks.values())  # a tag


def _unknown_task(manager: Any, name: str, include_flag: str) -> LmflowError:
    close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
    maybe = f" (did you mean {', '.join(close)}?)" if close else ""
    return LmflowError(
        f"lm-eval has no task {name!r}{maybe}",
        f"for a task of your own, pass {include_flag} DIR (the folder of its YAML file) or the YAML file's "
        "path; `lm-eval ls tasks` lists lm-eval's own",
    )


def _load_error(name: str, exc: Exception) -> LmflowError:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return LmflowError(
        f"the lm-eval task {name!r} could not be loaded: {type(exc).__name__}: {text}",
        "check its YAML file (a relative data_files path is read from the working directory)",
    )


def _needs_network(exc: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) says the data is neither local nor cached, so the hub is
    needed: ``ConnectionError`` (what ``datasets`` raises in offline mode) and huggingface_hub's errors."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ConnectionError) or type(exc).__name__ in (
            "OfflineModeIsEnabled",
            "LocalEntryNotFoundError",
        ):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _dataset_of(exc: BaseException) -> str:
    found = re.search(r"reach '([^']+)'", str(exc))
    return f"dataset {found.group(1)}" if found else " ".join(str(exc).split())


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's info and warnings (a model passed as an object, defaults it assumes) are not the user's to act
    on here; its errors still show."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------------------------------------------
# Running them
# --------------------------------------------------------------------------------------------------------------


def run_tasks(
    model: Any,
    tokenizer: Any,
    plan: TaskPlan,
    *,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``model`` as it is in memory (a PEFT model included), through lm-eval's
    ``HFLM(pretrained=model, tokenizer=tokenizer)``; returns lm-eval's results without the per-sample log.

    ``limit``: examples per task (below 1: a fraction of each task). The model is left in eval mode.
    """
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if limit is not None and float(limit).is_integer():
        limit = int(limit)
    with quiet_lm_eval(), hub_offline(not plan.online), _without_environment_probe(lm_eval):
        harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=harness_model,
            tasks=list(plan.objects),
            task_manager=plan.task_manager,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=False,
        )
    results.pop("samples", None)
    return results


@contextlib.contextmanager
def _without_environment_probe(lm_eval: Any) -> Iterator[None]:
    """simple_evaluate ends by describing the environment: ``git describe`` in the working directory (which
    prints "fatal: not a git repository" outside one) and torch's ``collect_env`` (pip, nvidia-smi...: seconds
    of subprocesses, inside a training process). lmflow's report names the versions that matter instead."""
    import lm_eval.evaluator as evaluator

    saved = {name: getattr(evaluator, name, None) for name in ("add_env_info", "get_git_commit_hash")}
    if saved["add_env_info"] is not None:
        evaluator.add_env_info = _versions
    if saved["get_git_commit_hash"] is not None:
        evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is not None:
                setattr(evaluator, name, value)


def _versions(storage: dict[str, Any]) -> None:
    from importlib.metadata import version

    import torch
    import transformers

    from lmflow_core import __version__

    storage.update(
        {
            "lmflow_version": __version__,
            "lm_eval_version": version("lm_eval"),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
        }
    )


def metrics_of(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's results as lmflow metrics: ``lm_eval/<task>/<metric>``, with ``/<filter>`` for a filter other
    than ``none`` (``lm_eval/gsm8k/exact_match/strict-match``); standard errors and non-numbers left out."""
    metrics: dict[str, float] = {}
    for task, values in (results.get("results") or {}).items():
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                continue
            suffix = "" if filter_name == "none" else f"/{filter_name}"
            metrics[f"{PREFIX}/{task}/{metric}{suffix}"] = float(value)
    return metrics


def table_of(results: dict[str, Any]) -> str:
    """lm-eval's own tables (tasks, then groups if any), as its CLI prints them."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def json_ready(results: dict[str, Any]) -> dict[str, Any]:
    """The results with what JSON cannot hold (numpy numbers, sets, objects) converted as lm-eval's CLI does."""
    import json

    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable))
