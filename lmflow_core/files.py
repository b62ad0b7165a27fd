"""Writing outputs so that a killed process never leaves half of one: staging directories renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


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
