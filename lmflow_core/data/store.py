"""Where prepared data lives: validated records and tokenized examples as Arrow files under ``$LMFLOW_CACHE``
(default ``~/.cache/lmflow``), read back memory-mapped, so a dataset of millions of records never sits in
Python objects.

* :class:`RecordWriter` writes validated records (one JSON text each) to an Arrow file batch by batch;
  :class:`Records` reads them back as a sequence of dicts.
* :func:`file_digest` is a data file's SHA-256, remembered per file state (path, size, modification time,
  inode), so an unchanged file is not read again to know it is unchanged.
* :func:`entry_lock` serialises the preparation of one cache entry across processes (``--nproc``, several
  runs at once): the first prepares it, the others wait for it, for as long as it takes, and then read it.
* :func:`scratch_dir` is a private directory for data that is not cached (removed when the process ends).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError

#: Records written to the Arrow file at a time (also the batch the tokenizer reads).
BATCH = 1000
COLUMN = "record"


def cache_root() -> Path:
    """Where prepared datasets are cached (``$LMFLOW_CACHE/datasets``)."""
    base = os.environ.get("LMFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmflow")
    return Path(base) / "datasets"


class RecordWriter:
    """Appends records to an Arrow stream file with one string column (each record's JSON) and hashes them:
    :attr:`fingerprint` identifies the content for the tokenization cache."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.path = path
        self._schema = pa.schema([(COLUMN, pa.large_string())])
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self._schema)  # with a footer: any batch is read alone
        self._pending: list[str] = []
        self._digest = hashlib.sha256()
        self.count = 0
        #: The top-level keys of the records written, in the order they first appeared.
        self.keys: dict[str, None] = {}

    def add(self, record: dict[str, Any], where: str) -> None:
        try:
            text = json.dumps(record, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"{where} holds a value that is not JSON data ({exc})",
                "a plugin's normalize_record must return JSON values (strings, numbers, lists, objects)",
            ) from None
        self._digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
        self._pending.append(text)
        self.keys.update(dict.fromkeys(record))
        self.count += 1
        if len(self._pending) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._pending:
            column = pa.array(self._pending, pa.large_string())
            self._writer.write_batch(pa.record_batch([column], schema=self._schema))
            self._pending = []

    def close(self) -> str:
        """Finish the file; returns the content's fingerprint."""
        self._flush()
        self._writer.close()
        self._sink.close()
        return self._digest.hexdigest()

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        except Exception:  # a half-written file is removed by the caller either way
            pass


class Records(Sequence):
    """The records of an Arrow file written by :class:`RecordWriter`: each record is decoded when it is read,
    a batch of :data:`BATCH` at a time, read from the file (not memory-mapped: what was read is freed, so
    going through a large dataset does not leave it resident). Compares equal to a list of the same records."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.path = path
        with pa.OSFile(str(path)) as handle:
            reader = pa.ipc.open_file(handle)
            self.batches = reader.num_record_batches
            last = reader.get_batch(self.batches - 1).num_rows if self.batches else 0
        self._length = (self.batches - 1) * BATCH + last if self.batches else 0
        self._batch: tuple[int, list[str]] | None = None  # the batch read last, for indexing

    def __len__(self) -> int:
        return self._length

    def texts(self, first: int = 0, stop: int | None = None) -> Iterator[list[str]]:
        """The JSON texts of batches ``first`` to ``stop`` (exclusive; default: to the end), a list a batch."""
        import pyarrow as pa

        with pa.OSFile(str(self.path)) as handle:
            reader = pa.ipc.open_file(handle)
            for index in range(first, self.batches if stop is None else min(stop, self.batches)):
                yield reader.get_batch(index).column(0).to_pylist()

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        number = index // BATCH
        if self._batch is None or self._batch[0] != number:  # indexing in order reads each batch once
            self._batch = (number, next(self.texts(number, number + 1)))
        return json.loads(self._batch[1][index % BATCH])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for texts in self.texts():
            for text in texts:
                yield json.loads(text)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Records | list | tuple):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Records({len(self)} records in {self.path})"


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, remembered under the cache by the file's state (resolved path, size,
    modification time in nanoseconds, inode and device): reading the file again is needed only when it
    changed."""
    from ..inputs import open_input_file

    with open_input_file(path, "dataset", "pass a regular .json or .jsonl file", DataError) as handle:
        return _digest(path, handle)


def _digest(path: Path, handle: Any) -> str:
    info = os.fstat(handle.fileno())
    state = f"{path.resolve()}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ino}\0{info.st_dev}"
    memo = cache_root() / "digests" / hashlib.sha256(state.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    try:
        known = memo.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    digest, left = hashlib.sha256(), info.st_size  # what the file held when it was opened
    while left > 0:
        chunk = handle.read(min(2**22, left))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    value = digest.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        staging = memo.with_name(f".{memo.name}.{os.getpid()}")
        staging.write_text(value)
        os.replace(staging, memo)
    except OSError:  # a cache that cannot be written only costs a read of the file next time
        pass
    return value


def entry_lock(key: str) -> Any:
    """An exclusive lock on the cache entry ``key`` (a file lock: processes of any number of runs, and of
    several machines sharing the cache, take turns); it waits without a time limit, since preparing a large
    dataset takes what it takes. Where the cache cannot hold a lock file the lock does nothing."""
    import contextlib

    from filelock import FileLock

    directory = cache_root() / "locks"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return FileLock(str(directory / f"{key}.lock"))
    except OSError:
        return contextlib.nullcontext()


def staging_dir(parent: Path) -> Path:
    """A new directory in ``parent`` to build a cache entry in, renamed into place once complete (a killed
    preparation leaves only a ``.staging-*`` directory, removed the next time an entry is staged there)."""
    parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(parent)
    return Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}@{socket.gethostname()}@", dir=parent))


def commit(staging: Path, entry: Path) -> None:
    """Move a complete staging directory to ``entry`` (replacing an older one)."""
    if entry.exists():
        shutil.rmtree(entry, ignore_errors=True)
    os.replace(staging, entry)


_SCRATCH: list[Path] = []


def scratch_dir() -> Path:
    """A private directory for prepared data that is not cached, removed when the process ends (in the
    cache's directory, or the system's temporary directory where the cache cannot be written)."""
    try:
        path = staging_dir(cache_root() / "scratch")
    except OSError:
        path = Path(tempfile.mkdtemp(prefix="lmflow-data-"))
    if not _SCRATCH:
        atexit.register(_remove_scratch)
    _SCRATCH.append(path)
    return path


def _remove_scratch() -> None:
    for path in _SCRATCH:
        shutil.rmtree(path, ignore_errors=True)


def _remove_abandoned(parent: Path) -> None:
    """Remove the staging directories of this machine's processes that are gone (killed in the middle of a
    preparation); another machine's (a cache shared over the network) are left to it."""
    host = socket.gethostname()
    for entry in parent.glob(".staging-*@*@*"):
        pid, owner, _ = entry.name[len(".staging-") :].split("@", 2)
        if owner == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Progress:
    """A progress bar on standard error for a long preparation, shown only in a terminal (a log file gets the
    summary line instead)."""

    def __init__(self, total: int | None, description: str, unit: str, show: bool):
        import sys

        self.bar = None
        if show and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                desc=description,
                unit=unit,
                unit_scale=True,
                unit_divisor=1024 if unit == "B" else 1000,
                leave=False,
            )

    def show(self, done: int, records: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(f"{records:,} records", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


#: Data files smaller than this are read without a progress bar (a second or two).
PROGRESS_FROM_BYTES = 32 * 2**20


def reading_progress(total: int | None, description: str) -> _Progress:
    """The progress bar of reading ``total`` bytes of data files (``None``: unknown, compressed files)."""
    return _Progress(total, description, "B", total is None or total >= PROGRESS_FROM_BYTES)


#: Tokenizing this many records or more shows a progress bar (in a terminal).
PROGRESS_FROM_RECORDS = 50_000


def records_progress(total: int, description: str) -> _Progress:
    """The progress bar of tokenizing ``total`` records."""
    return _Progress(total, description, "records", total >= PROGRESS_FROM_RECORDS)
