"""A run's output directory: when it is lmflow's, what lmflow wrote in it, and what a new run may do with it.

A directory is an lmflow run only if it holds lmflow's run record (``lmflow_run.json``, written before the
first step). The record lists the entries the run wrote (``outputs``); together with lmflow's own names
(checkpoints, staging directories, the record itself) that is everything ``--overwrite`` may delete. Anything
else in the directory belongs to the user: ``--overwrite`` then refuses and names it, and nothing is removed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .models import RUN_RECORD, read_json
from .version import __version__

if TYPE_CHECKING:
    from .config import RunConfig
    from .plugins import RunPlugins

RUN_CONFIG = "run_config.yaml"
STAGING_PREFIX = ".staging-"
FINAL_STAGING = f"{STAGING_PREFIX}final"

_RECORD_FILES = frozenset({RUN_RECORD, RUN_CONFIG, f".{RUN_RECORD}.tmp", f".{RUN_CONFIG}.tmp"})
_CHECKPOINT = re.compile(r"checkpoint-\d+")
_STAGING = re.compile(re.escape(STAGING_PREFIX) + r"(checkpoint-\d+|final)")
# Records written before they listed their outputs: the files a finished run of that version could hold.
_EARLIER_OUTPUTS = re.compile(
    r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json|training_args\.bin"
    r"|tokenizer\.json|tokenizer_config\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\.json|merges\.txt|chat_template\.jinja|chat_template\.json"
    r"|adapter_config\.json|adapter_model\.safetensors|adapter_model\.bin|README\.md"
)


def read_run_record(output_dir: Path) -> dict[str, Any] | None:
    """The run record in ``output_dir`` if it is one lmflow wrote, else None."""
    path = output_dir / RUN_RECORD
    if not path.is_file():
        return None
    record = read_json(path)
    return record if "lmflow_version" in record and "status" in record else None


def _entries(directory: Path) -> set[str]:
    try:
        return set(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return set()


def owned_entries(output_dir: Path, record: dict[str, Any] | None) -> set[str]:
    """The entries of ``output_dir`` that lmflow wrote: the record's outputs and lmflow's own names."""
    if record is None:
        return set()
    listed = record.get("outputs")
    owned = set()
    for name in _entries(output_dir):
        path = output_dir / name
        if name in _RECORD_FILES and not path.is_dir():
            owned.add(name)
        elif (
            (_CHECKPOINT.fullmatch(name) or _STAGING.fullmatch(name))
            and path.is_dir()
            and not path.is_symlink()
        ):
            owned.add(name)
        elif isinstance(listed, list) and name in listed:
            owned.add(name)
        elif not isinstance(listed, list) and _EARLIER_OUTPUTS.fullmatch(name):
            owned.add(name)
    return owned


def foreign_entries(output_dir: Path, record: dict[str, Any] | None) -> list[str]:
    """The entries of ``output_dir`` that lmflow did not write (sorted)."""
    return sorted(_entries(output_dir) - owned_entries(output_dir, record))


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class OutputPlan:
    """What a run will do with its output directory, decided before anything is loaded or changed."""

    resume_from: Path | None = None
    clear: bool = False  # --overwrite: delete the earlier run's outputs, just before training starts
    note: str | None = None
    outputs: frozenset[str] = frozenset()  # what the earlier run wrote (kept when resuming)


def plan_output_dir(
    config: Any, output_dir: Path, inputs: Iterable[tuple[str, str | None]] = ()
) -> OutputPlan:
    """Refuse to clobber an earlier run, a user's files or an input; find the checkpoint to resume from.

    ``inputs`` are ``(option, path)`` pairs (``("--dataset", "data.json")``): an input inside the output
    directory is refused, whether or not ``--overwrite`` was given. Nothing is changed here: an error found
    later (a bad template, a missing model) leaves the directory as it was.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir} is a file", "choose a directory")
    check_inputs_outside(output_dir, inputs)
    record = read_run_record(output_dir)
    occupied = bool(_entries(output_dir))
    if occupied and record is None:
        raise ConfigError(
            f"--output-dir {output_dir} is not empty and does not hold an lmflow run (no {RUN_RECORD}); "
            "lmflow never writes into or deletes a directory it did not create",
            "choose a new or empty directory",
        )
    status = record.get("status", "unfinished") if record else None
    earlier = frozenset(owned_entries(output_dir, record))

    if config.resume and config.resume != "latest":
        checkpoint = Path(config.resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise ConfigError(
                f"{checkpoint} is not a checkpoint (no trainer_state.json)",
                "pass --resume alone for the latest checkpoint in --output-dir, or a checkpoint-N directory",
            )
        if record is not None and checkpoint.resolve().parent != output_dir.resolve():
            raise ConfigError(
                f"--output-dir {output_dir} already holds another run; resuming {checkpoint} there would mix them",
                "choose a new or empty --output-dir",
            )
        return OutputPlan(resume_from=checkpoint, outputs=earlier)
    if config.resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint  # imports peft: only when resuming

        last = get_last_checkpoint(str(output_dir)) if record is not None else None
        if last is None and status == "completed":
            raise ConfigError(
                f"--resume: the completed run in {output_dir} saved no checkpoint to continue from",
                "use --overwrite to train it again, or choose another --output-dir",
            )
        if last is None:
            return OutputPlan(
                note=f"no checkpoint in {output_dir} to resume from; starting from the beginning",
                outputs=earlier,
            )
        return OutputPlan(resume_from=Path(last), outputs=earlier)
    if record is None:
        return OutputPlan()
    if config.overwrite:
        foreign = foreign_entries(output_dir, record)
        if foreign:
            raise ConfigError(
                f"--overwrite: {output_dir} holds files lmflow did not write ({_listing(foreign)}); "
                "nothing was deleted",
                "move them out of the directory, or choose another --output-dir",
            )
        return OutputPlan(clear=True)
    what = "a completed run" if status == "completed" else "an unfinished run"
    raise ConfigError(
        f"--output-dir {output_dir} already holds {what}",
        "pass --resume to continue it, --overwrite to replace it, or choose another --output-dir",
    )


def check_inputs_outside(output_dir: Path, inputs: Iterable[tuple[str, str | None]]) -> None:
    """Refuse inputs (``(option, path)`` pairs) that are the output directory or lie inside it."""
    target = Path(output_dir).expanduser().resolve()
    for option, item in inputs:
        if not item:
            continue
        source = Path(item).expanduser()
        if not source.exists():
            continue  # a hub id or a template name, or a path checked elsewhere
        source = source.resolve()
        if source == target or target in source.parents:
            raise ConfigError(
                f"{option} {item} lies inside --output-dir {output_dir}, where the run writes (and --overwrite "
                "deletes)",
                f"move it out of {output_dir}, or choose another --output-dir",
            )


def claim_output_dir(plan: OutputPlan, output_dir: Path) -> None:
    """Apply the plan right before training: remove an overwritten run's outputs, and half-written saves.

    Only what lmflow wrote is removed, entry by entry; the directory itself and anything else in it stay.
    """
    if plan.clear:
        record = read_run_record(output_dir)
        for name in sorted(owned_entries(output_dir, record) - {RUN_RECORD}):
            remove_entry(output_dir / name)
        # The record goes last: a run killed half-way through is still recognised as lmflow's.
        remove_entry(output_dir / RUN_RECORD)
    remove_staging(output_dir)


def rotate_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Delete the oldest ``checkpoint-N`` directories beyond ``keep`` (the newest always stays).

    Only directories named exactly ``checkpoint-<number>`` count: a user's ``checkpoint-500-good`` copy is not a
    checkpoint (transformers' own rotation would delete it).
    """
    if not keep or keep < 1:
        return
    steps = sorted(
        (int(name.split("-")[1]), name)
        for name in _entries(output_dir)
        if _CHECKPOINT.fullmatch(name)
        and (output_dir / name).is_dir()
        and not (output_dir / name).is_symlink()
    )
    for _step, name in steps[: max(len(steps) - keep, 0)]:
        shutil.rmtree(output_dir / name, ignore_errors=True)


def remove_staging(directory: Path) -> None:
    """Delete the half-written checkpoints and final saves a killed run left behind."""
    for name in _entries(directory):
        path = directory / name
        if _STAGING.fullmatch(name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def remove_entry(path: Path) -> None:
    """Delete a file, link or directory (a link itself, never what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


class OutputTracker:
    """The entries of a run's output directory that the run wrote, kept for the run record.

    Known names (checkpoints, staging, record) need no tracking; the final save's files and whatever a plugin
    writes while a hook that is given the output directory runs are added here.
    """

    def __init__(self, output_dir: Path, earlier: Iterable[str] = ()) -> None:
        self.output_dir = output_dir
        self.names: set[str] = set(earlier)

    def add(self, names: Iterable[str]) -> None:
        self.names.update(names)

    def watch(self, on_new: Callable[[], None] | None = None) -> _Watch:
        """Context manager: entries that appear in the output directory while it is open are the run's;
        ``on_new`` is called when there are some (to record them at once)."""
        return _Watch(self, on_new)

    def listed(self) -> list[str]:
        return sorted(self.names | {RUN_RECORD, RUN_CONFIG})


class _Watch:
    def __init__(self, tracker: OutputTracker, on_new: Callable[[], None] | None) -> None:
        self.tracker, self.on_new = tracker, on_new
        self.before: set[str] = set()

    def __enter__(self) -> _Watch:
        self.before = _entries(self.tracker.output_dir)
        return self

    def __exit__(self, *exc: Any) -> None:
        new = _entries(self.tracker.output_dir) - self.before - self.tracker.names
        if new:
            self.tracker.add(new)
            if self.on_new is not None:
                self.on_new()


def fsync_tree(path: str | Path) -> None:
    """Flush every file under ``path`` and the directories themselves to disk."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename into it) to disk, where the platform allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that it holds either the old or the new text, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def is_main_process() -> bool:
    """Whether this is the process that writes the run directory (rank 0, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


class RunRecorder:
    """Writes ``lmflow_run.json`` and ``run_config.yaml`` (main process only, atomically).

    The record says the directory is an lmflow run, which template and block size later commands use, and
    which entries the run wrote (``outputs``: all that ``--overwrite`` may delete). ``run_config.yaml`` holds
    the settings that define the run, so ``lmflow run --config out/run_config.yaml --output-dir other`` repeats
    it (how this run was started, ``--resume``/``--overwrite``, is left out).
    """

    def __init__(
        self,
        output_dir: Path,
        config: RunConfig,
        run_plugins: RunPlugins,
        template: str | None,
        block_size: int,
        outputs: OutputTracker,
    ) -> None:
        self.output_dir, self.config, self.run_plugins = output_dir, config, run_plugins
        self.template, self.block_size, self.outputs = template, block_size, outputs
        if "tensorboard" in config.report_to.split(","):
            outputs.add(["runs"])  # transformers' TensorBoard logs go to <output_dir>/runs

    def write(self, status: str, result: Any = None) -> None:
        if not is_main_process():
            return
        import yaml

        self.output_dir.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in self.config.to_dict().items() if k not in ("resume", "overwrite")}
        record = {
            "lmflow_version": __version__,
            "status": status,
            "template": self.template,
            "block_size": self.block_size,
            "plugins": self.run_plugins.versions(),
            "config": settings,
            "outputs": self.outputs.listed(),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if result is not None:
            record["result"] = result.to_dict()
        atomic_write(self.output_dir / RUN_RECORD, json.dumps(record, indent=2, default=_json_default) + "\n")
        atomic_write(self.output_dir / RUN_CONFIG, yaml.safe_dump(settings, sort_keys=False))


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
