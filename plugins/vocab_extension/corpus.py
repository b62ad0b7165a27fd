"""The corpus a tokenizer learns new pieces from: UTF-8 text files and directories of them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmflow_core import LmflowError, read_input_text


@dataclass
class Corpus:
    """The text to learn pieces from: its files and non-blank lines."""

    files: list[Path]
    lines: list[str]

    @property
    def characters(self) -> int:
        return sum(len(line) for line in self.lines)


def read_corpus(paths: Sequence[str | os.PathLike]) -> Corpus:
    """Read UTF-8 text files (directories are searched for files); an empty or non-text corpus is an error."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise LmflowError(f"--corpus {path} is a directory without files", "pass text files")
            files.extend(found)
        elif path.exists() or path.is_symlink():
            files.append(path)  # read below, where anything but a regular file is refused by name
        else:
            raise LmflowError(f"--corpus {path} does not exist", "pass text files or directories of them")
    lines: list[str] = []
    for path in files:
        text = read_input_text(path, "corpus file", "pass plain text files, converted to UTF-8")
        if "\x00" in text:
            raise LmflowError(
                f"corpus file {path} is binary, not text (it holds NUL bytes)", "pass text files"
            )
        lines.extend(line for line in text.splitlines() if line.strip())
    if not lines:
        raise LmflowError(
            f"the corpus ({', '.join(str(f) for f in files)}) holds no text",
            "pass files with the text to learn new pieces from",
        )
    return Corpus(files, lines)
