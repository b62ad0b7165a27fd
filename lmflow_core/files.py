"""Writing outputs so that a killed process never leaves half of one: staging directories renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConfigError


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
