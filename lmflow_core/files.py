"""Writing outputs so that a killed process never leaves half of one: staging directories renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConfigError

OUTPUT_RECORD = "lmflow_output.json"


def move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename the finished directory ``staging`` to ``output_dir``.

    An earlier ``output_dir`` is first moved aside (next to it, on the same file system) and deleted only once
    the new one is in place, so at every moment ``output_dir`` is either the old complete directory or the new
    one. ``staging`` should be a sibling of ``output_dir`` (same file system: the rename is atomic).
    """
    previous = None
    if output_dir.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".replaced-{output_dir.name}-", dir=output_dir.parent))
        os.replace(output_dir, previous / output_dir.name)
    os.replace(staging, output_dir)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def check_output_apart(output_dir: Path, inputs: list[str | os.PathLike], flag: str = "--output") -> None:
    """Refuse an output directory that is one of the inputs or holds one (replacing it would delete it)."""
    target = Path(output_dir).expanduser().resolve()
    for item in inputs:
        source = Path(item).expanduser()
        if not source.exists():
            continue  # a hub id, or a path checked elsewhere
        source = source.resolve()
        if source == target or target in source.parents:
            raise ConfigError(
                f"{flag} {output_dir} is or contains the input {item}; writing there would delete it",
                f"choose a {flag} outside the inputs",
            )


def write_output_record(staging: Path, command: str) -> None:
    """Record in a finished staging directory that lmflow wrote it, and which entries (``lmflow_output.json``):
    what ``--overwrite`` may later replace."""
    from .version import __version__

    outputs = sorted(name for name in os.listdir(staging) if name != OUTPUT_RECORD)
    record = {"lmflow_version": __version__, "command": command, "outputs": outputs}
    (staging / OUTPUT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def check_replaceable(output_dir: Path, overwrite: bool, flag: str = "--output") -> None:
    """Refuse an occupied output directory unless ``overwrite``; with it, unless all that is there is lmflow's.

    A directory is replaced as a whole (:func:`move_into_place`), so it must hold only what an lmflow command
    wrote: the entries its ``lmflow_output.json`` lists, or an lmflow run's (its run record). Anything else is
    named, and nothing is deleted.
    """
    from .models import read_json
    from .rundir import foreign_entries, read_run_record

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{flag} {output_dir} is a file", "choose a directory")
    entries = set(os.listdir(output_dir)) if output_dir.is_dir() else set()
    if not entries:
        return
    if not overwrite:
        raise ConfigError(
            f"{flag} {output_dir} already exists and is not empty",
            f"choose another {flag}, or pass --overwrite to replace it",
        )
    marker = read_json(output_dir / OUTPUT_RECORD)
    record = read_run_record(output_dir)
    if "lmflow_version" in marker and isinstance(marker.get("outputs"), list):
        foreign = sorted(entries - set(marker["outputs"]) - {OUTPUT_RECORD})
    elif record is not None:
        foreign = foreign_entries(output_dir, record)
    else:
        raise ConfigError(
            f"--overwrite: {flag} {output_dir} was not written by lmflow (it has no {OUTPUT_RECORD}); "
            "nothing was deleted",
            f"choose another {flag}, or empty the directory yourself",
        )
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise ConfigError(
            f"--overwrite: {flag} {output_dir} holds files lmflow did not write ({shown}); nothing was deleted",
            f"move them out of the directory, or choose another {flag}",
        )
