"""Reading and validating datasets.

Accepted inputs: a file, or a directory whose data files are all read, in name order (its other entries are
named in a note). Data files are regular files (a symlink to one is fine) named ``.json`` or ``.jsonl``, in any
case, optionally gzipped (``.json.gz``, ``.jsonl.gz``: decompressed as they are read). Named pipes, devices and
JSON nested deeper than Python can parse are refused with an error naming the file. The formats:

* the LMFlow format, ``{"type": T, "instances": [...]}`` in a ``.json`` file, with ``T`` one of
  ``text_only`` (``{"text"}``), ``text2text`` (``{"input", "output"}``) and ``conversation``
  (``{"system"?, "messages": [{"role", "content"}, ...]}``);
* ``.jsonl`` files with one such instance per line, or a ``.json`` list of instances: the type is inferred from
  the keys of the records;
* Alpaca-style records (``{"instruction", "input"?, "output"}``), converted to one-turn conversations whose user
  message is the instruction followed by the input.

* ShareGPT records (``{"conversations": [{"from", "value"}, ...]}``, roles ``human``/``gpt``/``system``/
  ``tool``/``function_call``/``observation``), converted to conversations;
* OpenAI chat records (``{"messages": [...]}``), whose contents may be strings or lists of content parts;
* preference pairs (``{"prompt" or "messages"?, "chosen", "rejected"}``, see :func:`_pair`), the data of reward
  models and DPO: text pairs become ``paired_text2text`` records, message lists ``paired_conversation`` ones
  (also the LMFlow types ``paired_conversation`` and ``paired_text_to_text``).

A record's format is detected from its keys (``--dataset-format auto``) or named with ``--dataset-format``.
A dataset may also be a Hugging Face hub id (``org/name[:split]``, see :mod:`.hub`), read through ``datasets``.

Every record is checked; the first malformed one stops the run with an error naming its file and index.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DATASET_FORMATS  # ``--dataset-format`` values; ``auto`` detects each record's format
from ..errors import DataError
from ..inputs import DATASET_FILE_LIMIT, format_bytes, open_input_stream
from ..templates import Conversation, Template, TemplateError
from .store import (
    BATCH,
    Records,
    RecordWriter,
    cache_root,
    commit,
    entry_lock,
    file_digest,
    reading_progress,
    scratch_dir,
    staging_dir,
)

TYPES = ("text_only", "text2text", "conversation", "paired_conversation", "paired_text2text")
#: Record types that hold a chosen and a rejected answer to one prompt (trained with a pairwise loss).
PAIRED_TYPES = ("paired_conversation", "paired_text2text")
#: LMFlow "type" names read as another: the original toolkit calls text pairs ``paired_text_to_text``.
_TYPE_ALIASES = {"paired_text_to_text": "paired_text2text"}
ALPACA = "alpaca"
SHAREGPT = "sharegpt"
PREFERENCE = "preference"
#: What each format is called in messages, and the key(s) that identify it.
FORMAT_NAMES = {
    "lmflow": 'LMFlow ({"type", "instances"})',
    "openai": 'OpenAI chat ("messages")',
    SHAREGPT: 'ShareGPT ("conversations")',
    ALPACA: 'Alpaca ("instruction", "output")',
    "text": 'text ("text")',
    "text2text": 'text2text ("input", "output")',
    PREFERENCE: 'preference ("chosen", "rejected")',
    "plugin": "a plugin's normalize_record",
}
#: The record type each record format becomes.
FORMAT_TYPES = {
    "openai": "conversation",
    SHAREGPT: "conversation",
    ALPACA: "conversation",
    "text": "text_only",
    "text2text": "text2text",
}
#: The formats that rewrite a record into another shape, counted as "converted from" in the statistics.
_CONVERTED = (ALPACA, SHAREGPT)
#: ShareGPT speakers (``from``) and the roles they become; ``function_call`` is an assistant's tool call.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "function_call": "assistant",
}
#: Other names OpenAI-style messages use for roles: the newer "developer" for system, the legacy "function".
_ROLE_ALIASES = {"developer": "system", "function": "tool"}
#: Content parts that carry text; any other part (images, audio, files) cannot be trained as text.
_TEXT_PARTS = ("text", "input_text", "output_text")
#: Names of the files a dataset is read from, compared in lower case; longest first, so ``.jsonl.gz`` wins.
SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json")
_SUFFIX_NAMES = ".json or .jsonl file (optionally gzipped: .json.gz, .jsonl.gz)"
_READ_NAMES = ".json, .jsonl, .json.gz and .jsonl.gz"
#: The largest single record (a JSON Lines line, an element of a JSON list) lmflow parses; a file is read as a
#: stream, so only this much of it (and a read-ahead of ``_READ_AHEAD``) is ever held.
RECORD_LIMIT = 256 * 2**20
#: Bump when reading or validation changes, so old cached records are not reused.
RECORDS_FORMAT = "lmflow-records-v1"
RECORDS_FILE = "records.arrow"
_READ_AHEAD = 2**20
#: Nesting that no real record reaches; where a file nests deeper than Python parses, the error shows the spot.
MAX_DEPTH = 500
#: Auto-detection: the first key a record has decides its format.
_KEYS_TO_FORMAT = (
    ("chosen", PREFERENCE),
    ("rejected", PREFERENCE),
    ("messages", "openai"),
    ("conversations", SHAREGPT),
    ("instruction", ALPACA),
    ("text", "text"),
    ("input", "text2text"),
    ("output", "text2text"),
)


@dataclass
class RawDataset:
    """Validated records of one dataset, normalised to its type's shape.

    ``records`` hold ``{"text"}`` (text_only), ``{"input", "output"}`` (text2text) or ``{"system",
    "messages"}`` (conversation, Alpaca and ShareGPT records included): a list, or (as
    :func:`load_raw_dataset` returns them) :class:`~lmflow_core.data.store.Records` read memory-mapped from an
    Arrow file, a sequence of the same dicts. ``formats`` counts the records of each format (``FORMAT_NAMES``);
    ``hub`` describes a dataset read from the Hugging Face hub (repository, config, split and resolved
    revision), ``None`` for local files. ``fingerprint`` identifies the records' content (the tokenization
    cache's key); ``seconds`` is how long reading and validating took (0 when the records came from the
    cache, ``cached``), ``bytes`` how much was read.
    """

    type: str
    records: Sequence[dict[str, Any]]
    files: list[Path]
    converted: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    hub: dict[str, Any] | None = None
    #: The record count once :meth:`release` dropped the records.
    released: int | None = None
    fingerprint: str | None = None
    seconds: float = 0.0
    bytes: int | None = None
    cached: bool = False
    #: The records' top-level keys (of any record), when known without reading the records.
    columns: list[str] | None = None

    def __len__(self) -> int:
        return self.released if self.released is not None else len(self.records)

    def release(self) -> None:
        """Drop the records once they are tokenized: a large dataset's records would otherwise stay reachable
        through training. The count stays."""
        self.released = len(self)
        self.records = []

    def save_meta(self, directory: Path) -> None:
        meta = {
            "format": RECORDS_FORMAT,
            "type": self.type,
            "files": [str(f) for f in self.files],
            "converted": dict(self.converted),
            "formats": dict(self.formats),
            "hub": self.hub,
            "fingerprint": self.fingerprint,
            "seconds": self.seconds,
            "bytes": self.bytes,
            "columns": self.columns,
        }
        (directory / "meta.json").write_text(json.dumps(meta))

    @classmethod
    def from_directory(cls, directory: Path, cached: bool = False) -> RawDataset:
        """The dataset :func:`load_raw_dataset` wrote to ``directory``, its records memory-mapped."""
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("format") != RECORDS_FORMAT:
            raise ValueError("an entry of another format")
        return cls(
            meta["type"],
            Records(directory / RECORDS_FILE),
            [Path(f) for f in meta["files"]],
            Counter(meta["converted"]),
            Counter(meta["formats"]),
            hub=meta["hub"],
            fingerprint=meta["fingerprint"],
            seconds=0.0 if cached else meta["seconds"],
            bytes=meta["bytes"],
            cached=cached,
            columns=meta["columns"],
        )

    @property
    def uses_template(self) -> bool:
        """Whether the records are conversations, which a template renders."""
        return self.type in ("conversation", "paired_conversation")

    @property
    def paired(self) -> bool:
        """Whether the records are preference pairs (a chosen and a rejected answer to one prompt)."""
        return self.type in PAIRED_TYPES

    @property
    def hub_description(self) -> str | None:
        """``hub dataset org/name (config C, split S, revision R, from the ...)``; ``None`` for local files."""
        if self.hub is None:
            return None
        hub = self.hub
        return (
            f"hub dataset {hub['repo']} (config {hub['config']}, split {hub['split']}, revision "
            f"{hub['revision'] or 'unknown'}, from the {hub['from']})"
        )

    @property
    def name(self) -> str:
        """What to call the dataset in messages: its first file, or ``org/name[split]`` for a hub dataset."""
        if self.hub is not None:
            return f"{self.hub['repo']}[{self.hub['split']}]"
        return str(self.files[0])


def data_suffix(path: str | Path) -> str | None:
    """The data-file suffix of ``path`` in lower case (``".jsonl.gz"`` for ``x.JSONL.GZ``), or ``None``."""
    name = Path(path).name.lower()
    return next((suffix for suffix in SUFFIXES if name.endswith(suffix) and name != suffix), None)


def dataset_files(path: str | Path) -> list[Path]:
    """The data files at ``path`` (itself, or the data files of a directory, in name order)."""
    return _scan(Path(path).expanduser())[0]


def _scan(path: Path) -> tuple[list[Path], list[str]]:
    """The data files at ``path`` and the names of a directory's entries that are not read."""
    if path.is_dir():
        files, skipped = [], []
        for entry in sorted(path.iterdir()):
            if data_suffix(entry) is not None:
                files.append(entry)  # a pipe or device with a data name is refused when it is read
            elif not entry.name.startswith("."):  # .gitattributes, .cache...: never data, not worth a note
                skipped.append(entry.name + ("/" if entry.is_dir() else ""))
        if not files:
            raise DataError(
                f"dataset directory {path} holds no .json or .jsonl file"
                + (f" (it holds {_listing(skipped)})" if skipped else ""),
                "check the path",
            )
        return files, skipped
    if not path.exists() and not path.is_symlink():
        raise DataError(f"dataset {path} does not exist", "check the path")
    if data_suffix(path) is None:
        raise DataError(
            f"dataset {path} is not a {_SUFFIX_NAMES}", "convert it to one of the formats in README"
        )
    return [path], []


def _listing(names: list[str], shown: int = 5) -> str:
    listed = ", ".join(names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


Normalizer = Callable[[Any, "str | None", str], "tuple[str, dict[str, Any]] | None"]


def load_raw_dataset(
    path: str | Path,
    template: Template | None = None,
    max_samples: int | None = None,
    normalize: Normalizer | None = None,
    *,
    dataset_format: str = "auto",
    dataset_config: str | None = None,
    dataset_revision: str | None = None,
    purpose: str = "train",
) -> RawDataset:
    """Read and validate every record of the dataset at ``path``.

    Files are read as a stream and the validated records written to an Arrow file (``records`` reads them back
    memory-mapped), so memory does not grow with the dataset. Records read from local files without a
    ``normalize`` hook are cached under ``$LMFLOW_CACHE/datasets``, keyed by the files' paths and contents and
    the reading settings: unchanged data is not read again (``cached`` is then set). Processes reading the same
    data at once take turns: one reads, the others then find it cached.

    Args:
        path: a data file, a directory of them, or a Hugging Face hub dataset id (``org/name`` or
            ``org/name:split``) where no local path of that name exists.
        template: when given, every conversation is also checked against it (roles, order, system prompt).
        max_samples: keep only the first N records (after validation of those N).
        normalize: the ``normalize_record`` hook: ``(record, declared_type, where, data_file)`` ->
            ``(type, record)`` for record shapes a plugin understands, or ``None`` for the core's own formats.
            Pass ``None`` when no plugin implements it (records are then cached).
        dataset_format: one of ``DATASET_FORMATS``: ``auto`` detects each record's format from its keys; any
            other value reads every record as that format.
        dataset_config, dataset_revision: the configuration and revision of a hub dataset.
        purpose: ``"train"`` or ``"eval"``: which split of a hub dataset is read when none is named.

    Raises:
        DataError: naming the file and record index of the first problem.
    """
    from .hub import hub_reference, read_hub_dataset

    if dataset_format not in DATASET_FORMATS:
        raise DataError(
            f"unknown dataset format {dataset_format!r}", f"choose one of {', '.join(DATASET_FORMATS)}"
        )
    reference = hub_reference(str(path))
    hub, files, size = None, [], None
    tally = [0]  # bytes read so far, for the progress bar
    if reference is not None:
        if dataset_format == "lmflow":
            raise DataError(
                f"--dataset-format lmflow reads LMFlow files, but {path} is a hub dataset",
                "pass --dataset-format auto (or the format of its rows)",
            )
        rows, hub = read_hub_dataset(reference, dataset_config, dataset_revision, purpose)
        label = f"{hub['repo']}[{hub['split']}]"
        items: Any = ((f"{label}#{i}", None, row, None) for i, row in enumerate(rows))
    else:
        if dataset_config or dataset_revision:
            from ..report import note

            note(f"--dataset-config and --dataset-revision apply to hub datasets; {path} is read from disk")
        files, skipped = _scan(Path(path).expanduser())
        if skipped:
            from ..report import note

            verb = "is" if len(skipped) == 1 else "are"
            note(
                f"dataset directory {path}: {_listing(skipped)} {verb} not read (only {_READ_NAMES} files are)"
            )
        size = _total_size(files)
        items = _file_items(files, dataset_format, tally)
    read = functools.partial(
        _read_records, items, path, template, max_samples, normalize, dataset_format, files, hub, size, tally
    )
    # Records from local files whose reading no plugin changes are cached, keyed by the files' contents.
    key = _records_key(files, dataset_format, template, max_samples) if files and normalize is None else None
    if key is None:
        return read(scratch_dir())
    entry = cache_root() / f"records-{key}"
    with entry_lock(entry.name):  # under --nproc one process reads, the others wait for its result
        if (entry / "meta.json").is_file():
            try:
                return RawDataset.from_directory(entry, cached=True)
            except (OSError, ValueError, KeyError):  # a damaged entry is read again
                pass
        try:
            staging = staging_dir(cache_root())
        except OSError:  # the cache cannot be written: read into a private directory
            return read(scratch_dir())
        try:
            read(staging)
            commit(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return RawDataset.from_directory(entry)


def _total_size(files: list[Path]) -> int | None:
    """The bytes to read from ``files`` (``None`` when one is compressed: its text's size is unknown)."""
    try:
        if any(f.name.lower().endswith(".gz") for f in files):
            return None
        return sum(f.stat().st_size for f in files)
    except OSError:
        return None


def _records_key(
    files: list[Path], dataset_format: str, template: Template | None, max_samples: int | None
) -> str:
    """What the validated records of local files depend on: each file's path and content, how they are read,
    the template they are checked against, and lmflow's version (its validation)."""
    from ..version import __version__

    digest = hashlib.sha256()
    for part in (RECORDS_FORMAT, __version__, dataset_format, repr(template), str(max_samples)):
        digest.update(part.encode() + b"\0")
    for file in files:
        digest.update(f"{file.resolve()}\0{file_digest(file)}\0".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def _read_records(
    items: Any,
    path: str | Path,
    template: Template | None,
    max_samples: int | None,
    normalize: Normalizer | None,
    dataset_format: str,
    files: list[Path],
    hub: dict[str, Any] | None,
    size: int | None,
    tally: list[int],
    directory: Path,
) -> RawDataset:
    """Validate every record of ``items`` and write them to ``directory`` (``records.arrow`` and
    ``meta.json``), one batch at a time: memory holds a batch, never the dataset."""
    started = time.monotonic()
    writer = RecordWriter(directory / RECORDS_FILE)
    dataset: RawDataset | None = None
    progress = reading_progress(size, f"Reading {Path(str(path)).name}")
    try:
        for where, declared, item, data_file in items:
            if max_samples is not None and writer.count >= max_samples:
                break
            try:
                custom = normalize(item, declared, where, data_file) if normalize is not None else None
                if custom is not None:
                    (record_type, record), record_format = custom, "plugin"
                else:
                    record_format, record_type, record = _normalise(item, declared, where, dataset_format)
            except RecursionError:
                raise DataError(
                    f"{where} is nested too deeply to read",
                    "flatten the record (real records nest a few levels)",
                ) from None
            if _base_type(record_type) not in TYPES:
                raise DataError(f"{where}: a plugin returned the unknown record type {record_type!r}")
            if dataset is None:
                dataset = RawDataset(_base_type(record_type), [], files, hub=hub)
            elif _base_type(record_type) != dataset.type:
                raise DataError(
                    f"{where} is a {record_type} record but earlier records are {dataset.type}",
                    "a dataset holds one type of record; split it into separate datasets",
                )
            if record_type == ALPACA:  # a plugin may still return the legacy "alpaca" type
                record_format = ALPACA
            if record_format in _CONVERTED:
                dataset.converted[record_format] += 1
            dataset.formats[record_format] += 1
            if template is not None and dataset.type in ("conversation", "paired_conversation"):
                try:
                    for messages in _checked_conversations(record):
                        template.check(
                            Conversation.from_messages(messages, record["system"], record.get("tools"))
                        )
                except TemplateError as exc:
                    raise DataError(
                        f"{where}: {exc.message}", exc.hint or "fix the record or choose another --template"
                    ) from exc
            writer.add(record, where)
            if writer.count % BATCH == 0:
                progress.show(tally[0], writer.count)
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
    fingerprint = writer.close()
    if dataset is None or writer.count == 0:
        raise DataError(f"dataset {path} holds no records", "add records or check the path")
    dataset.fingerprint, dataset.seconds, dataset.bytes = fingerprint, time.monotonic() - started, size
    dataset.columns = list(writer.keys)
    dataset.save_meta(directory)
    return RawDataset.from_directory(directory)


def _file_items(files: list[Path], dataset_format: str, tally: list[int]) -> Any:
    """``(where, declared type, item, file)`` for every record of ``files``, read one file at a time."""
    for file in files:
        kind, items = _read_file(file, tally)
        if kind is not None and dataset_format not in ("auto", "lmflow"):
            raise DataError(
                f'{file} is an LMFlow dataset ("type": "{kind}"), not {FORMAT_NAMES[dataset_format]}',
                "pass --dataset-format lmflow (or auto)",
            )
        if kind is None and dataset_format == "lmflow":
            raise DataError(
                f'{file} is not an LMFlow dataset ({{"type", "instances"}}) but --dataset-format is lmflow',
                "pass --dataset-format auto to detect the records' format",
            )
        for label, item in items:
            yield f"{file}: {label}", kind, item, file


def _read_file(file: Path, tally: list[int]) -> tuple[str | None, Iterator[tuple[str, Any]]]:
    """``(declared type or None, iterator of (label, item))`` of one file, read as a stream: the file is never
    held whole, only the record being parsed (and a read-ahead of a few MiB). Labels say where an item is."""
    if (data_suffix(file) or "").startswith(".jsonl"):
        return None, _jsonl_items(file, tally)
    items = _json_items(file, tally)
    return next(items), items  # the first value is the declared type (None for a list of records)


def _open(file: Path) -> Any:
    return open_input_stream(
        file, "dataset", "pass a regular .json or .jsonl file", DataError, DATASET_FILE_LIMIT, decompress=True
    )


def _not_utf8(file: Path, byte: int) -> DataError:
    return DataError(f"dataset {file} is not UTF-8 text (byte {byte})", "re-encode the file as UTF-8")


def _too_long(file: Path, label: str) -> DataError:
    return DataError(
        f"{file}: {label} holds more than the {format_bytes(RECORD_LIMIT)} lmflow reads as one record (or is not "
        "valid JSON)",
        "check the record; a record this large is not a training example",
    )


def _jsonl_items(file: Path, tally: list[int]) -> Iterator[tuple[str, Any]]:
    with _open(file) as stream:
        number, offset = 0, 0
        while True:
            raw = stream.readline(RECORD_LIMIT + 1)
            if not raw:
                return
            number += 1
            if len(raw) > RECORD_LIMIT and not raw.endswith(b"\n"):
                raise _too_long(file, f"line {number}")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(file, offset + exc.start) from None
            offset += len(raw)
            tally[0] += len(raw)
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{file}: line {number} is not valid JSON ({exc.msg})", "fix that line"
                ) from exc
            except RecursionError:
                raise _too_deep(file, line, f"line {number}") from None
            yield f"line {number}", item


_MISSING = object()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_NOT_LMFLOW = (
    'is neither an LMFlow dataset ({"type", "instances"}) nor a list of records',
    "see README, Data formats",
)


class _JsonText:
    """A JSON document read as a stream: values are parsed one at a time (``json``'s own decoder, on a buffer
    that holds the value being read and a chunk of read-ahead), and errors give the line and column in the
    file."""

    def __init__(self, stream: Any, file: Path, tally: list[int]):
        self.stream, self.file, self.tally = stream, file, tally
        self.buffer, self.pos, self.eof = "", 0, False
        self.line, self.column = 1, 0  # where buffer[0] is in the file (column: characters before it)
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.bytes = 0

    def fill(self, size: int = _READ_AHEAD) -> bool:
        """Read ``size`` more bytes (dropping what was consumed); whether anything was read."""
        if self.eof:
            return False
        if self.pos:
            dropped = self.buffer[: self.pos]
            newlines = dropped.count("\n")
            if newlines:
                self.line += newlines
                self.column = len(dropped) - dropped.rfind("\n") - 1
            else:
                self.column += len(dropped)
            self.buffer, self.pos = self.buffer[self.pos :], 0
        data = self.stream.read(size)
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise _not_utf8(self.file, self.bytes + exc.start) from None
        self.bytes += len(data)
        self.tally[0] += len(data)
        self.eof = not data
        self.buffer += text
        return bool(data)

    def where(self, pos: int) -> tuple[int, int]:
        """The line and column (both from 1) of ``buffer[pos]`` in the file."""
        newlines = self.buffer.count("\n", 0, pos)
        if newlines:
            return self.line + newlines, pos - self.buffer.rfind("\n", 0, pos)
        return self.line, self.column + pos + 1

    def invalid(self, pos: int, message: str) -> DataError:
        line, column = self.where(pos)
        return DataError(
            f"{self.file} is not valid JSON (line {line}, column {column}: {message})", "fix the syntax"
        )

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end of the file), not consumed."""
        while True:
            self.pos = _WHITESPACE.match(self.buffer, self.pos).end()
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self.fill() and self.pos >= len(self.buffer):
                return ""

    def take(self, expected: str, message: str) -> str:
        """Consume the next character, which must be one of ``expected``."""
        char = self.peek()
        if not char or char not in expected:
            raise self.invalid(self.pos, message)
        self.pos += 1
        return char

    def value(self, label: str | None = None, depth: int = 0) -> Any:
        """Parse the next value; a value cut by the read-ahead is read again with more text."""
        self.peek()
        size = _READ_AHEAD
        while True:
            try:
                item, end = _DECODER.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as exc:
                if self.eof:
                    raise self.invalid(exc.pos, exc.msg) from None
                if len(self.buffer) - self.pos > RECORD_LIMIT:
                    raise _too_long(self.file, label or "a value") from None
                self.fill(size)
                size *= 2  # a large value is read again a few times, not once per chunk
                continue
            except RecursionError:
                raise self.too_deep(label, depth) from None
            if end == len(self.buffer) and not self.eof:  # a number at the end may go on in the next chunk
                self.fill(size)
                continue
            self.pos = end
            return item

    def too_deep(self, label: str | None, depth: int) -> DataError:
        """The error for a value (``depth`` levels down in the file) nesting deeper than ``MAX_DEPTH``."""
        spot = _deep_spot(self.buffer[self.pos :], MAX_DEPTH - depth)
        line, column = self.where(self.pos)
        if spot is not None:
            column = column + spot[1] - 1 if spot[0] == 1 else spot[1]
            line += spot[0] - 1
        return DataError(
            f"{self.file}: {label + ', ' if label else ''}line {line}, column {column} nests JSON more than "
            f"{MAX_DEPTH} levels deep, deeper than lmflow reads",
            "flatten the record (real records nest a few levels)",
        )

    def items(self, name: str, depth: int = 1) -> Iterator[tuple[str, Any]]:
        """The elements of the list that starts here, as ``("{name} {i}", element)``."""
        self.take("[", "Expecting '['")
        if self.peek() == "]":
            self.pos += 1
            return
        index = 0
        while True:
            label = f"{name} {index}"
            yield label, self.value(label, depth)
            index += 1
            if self.take(",]", "Expecting ',' delimiter") == "]":
                return

    def key(self) -> str:
        if self.peek() != '"':
            raise self.invalid(self.pos, "Expecting property name enclosed in double quotes")
        name = self.value()
        self.take(":", "Expecting ':' delimiter")
        return name

    def end(self) -> None:
        if self.peek():
            raise self.invalid(self.pos, "Extra data")


def _json_items(file: Path, tally: list[int], declared: str | None = None) -> Iterator[Any]:
    """The declared type (``None`` for a list of records), then ``(label, item)`` for each record of a
    ``.json`` file: a list of records or an LMFlow ``{"type", "instances"}`` object. Where ``"type"`` comes
    after ``"instances"``, the instances are parsed once to find it (without being kept) and read again."""
    deferred, type_value = False, _MISSING
    with _open(file) as stream:
        text = _JsonText(stream, file, tally)
        first = text.peek()
        if first == "[":
            yield None
            yield from text.items("record")
            text.end()
            return
        if first != "{":
            if not first:
                raise text.invalid(text.pos, "Expecting value")
            text.value()
            text.end()
            raise DataError(f"{file} {_NOT_LMFLOW[0]}", _NOT_LMFLOW[1])
        text.take("{", "Expecting '{'")
        found = False
        if text.peek() == "}":
            text.pos += 1
        else:
            while True:
                name = text.key()
                if name == "instances":
                    if text.peek() != "[":
                        text.value()
                        raise DataError(f'{file}: "instances" must be a list of records')
                    if found:
                        raise DataError(f'{file} holds "instances" twice', "keep one list of instances")
                    found = True
                    if declared is not None:
                        yield declared
                        yield from text.items("instance", 2)
                    elif type_value is not _MISSING:
                        yield _lmflow_type(file, type_value)
                        yield from text.items("instance", 2)
                    else:  # "type" comes later: find it, then read the instances again
                        for _ in text.items("instance", 2):
                            pass
                        deferred = True
                elif name == "type":
                    type_value = text.value()
                else:
                    text.value()
                if text.take(",}", "Expecting ',' delimiter") == "}":
                    break
        text.end()
        if not found:
            raise DataError(f"{file} {_NOT_LMFLOW[0]}", _NOT_LMFLOW[1])
    if deferred:
        yield from _json_items(
            file, tally, _lmflow_type(file, None if type_value is _MISSING else type_value)
        )


def _lmflow_type(file: Path, kind: Any) -> str:
    kind = _TYPE_ALIASES.get(kind, kind) if isinstance(kind, str) else kind
    if kind not in TYPES:
        raise DataError(
            f'{file}: "type" is {kind!r}; expected one of {", ".join(TYPES)}',
            "set the dataset type at the top of the file",
        )
    return kind


def _too_deep(file: Path, text: str, label: str | None = None) -> DataError:
    """The error for JSON nested deeper than Python parses, naming the record and the spot where it goes deep."""
    spot = _deep_spot(text, MAX_DEPTH)
    where = label
    if spot is not None:
        line, column, record = spot
        where = where or record
        position = f"line {line}, column {column}" if label is None else f"column {column}"
        where = f"{where + ', ' if where else ''}{position}"
    return DataError(
        f"{file}: {where or 'the file'} nests JSON more than {MAX_DEPTH} levels deep, deeper than lmflow reads",
        "flatten the record (real records nest a few levels)",
    )


def _deep_spot(text: str, limit: int) -> tuple[int, int, str | None] | None:
    """``(line, column, record label)`` where ``text`` first nests deeper than ``limit``; ``None`` if it never
    does. The label is ``record N`` in a list of records, ``instance N`` in an LMFlow file."""
    stack: list[list] = []  # [bracket, index of the current element if a list]
    key, in_string, escaped, line, line_start = None, False, False, 1, 0
    string_start = 0
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
                if len(stack) == 1 and stack[0][0] == "{":
                    key = text[string_start + 1 : i]
            continue
        if char == '"':
            in_string, string_start = True, i
        elif char in "[{":
            stack.append([char, 0])
            if len(stack) > limit:
                label = None
                if stack[0][0] == "[":
                    label = f"record {stack[0][1]}"
                elif key == "instances" and stack[1][0] == "[":
                    label = f"instance {stack[1][1]}"
                return line, i - line_start + 1, label
        elif char in "]}" and stack:
            stack.pop()
        elif char == "," and stack and stack[-1][0] == "[":
            stack[-1][1] += 1
        elif char == "\n":
            line, line_start = line + 1, i + 1
    return None


def _base_type(record_type: str) -> str:
    return "conversation" if record_type == ALPACA else record_type


def detect_format(item: dict[str, Any]) -> str | None:
    """The format of a record from its keys (``FORMAT_NAMES``), or ``None`` when it fits none."""
    for key, kind in _KEYS_TO_FORMAT:
        if item.get(key) is not None:  # rows read through Arrow carry the other formats' keys as None
            if kind == "openai" and _sharegpt_messages(item[key]):
                return SHAREGPT  # {"messages": [{"from", "value"}]}: ShareGPT turns under the OpenAI key
            return kind
    return None


def _sharegpt_messages(messages: Any) -> bool:
    return (
        isinstance(messages, list)
        and bool(messages)
        and isinstance(messages[0], dict)
        and messages[0].get("from") is not None
        and messages[0].get("role") is None
    )


def _normalise(
    item: Any, declared: str | None, where: str, dataset_format: str = "auto"
) -> tuple[str, str, dict[str, Any]]:
    """``(format, type, record)`` of one item: its format, its record type and the normalised record."""
    if not isinstance(item, dict):
        raise DataError(f"{where} must be a JSON object, got {type(item).__name__}", "fix the record")
    if declared is not None:  # an LMFlow file: its "type" says how every instance is read
        record_format, kind = "lmflow", declared
    elif dataset_format == "auto":
        record_format = detect_format(item)
        if record_format is None:
            tried = ", ".join(FORMAT_NAMES[name] for name in DATASET_FORMATS[2:])
            raise DataError(
                f"{where} has keys {sorted(item)} and fits none of the formats tried: {tried}",
                "fix the record (see README, Data formats) or name its format with --dataset-format",
            )
        kind = FORMAT_TYPES.get(record_format)
    else:
        record_format, kind = dataset_format, FORMAT_TYPES.get(dataset_format)
    if record_format == PREFERENCE or kind in PAIRED_TYPES:
        kind, record = _pair(item, where, kind if record_format == "lmflow" else None)
        return record_format, kind, record
    if kind == "text_only":
        return (
            record_format,
            kind,
            {"text": _string(item, "text", where, allow_empty=False, fmt=record_format)},
        )
    if kind == "text2text":
        return (
            record_format,
            kind,
            {
                "input": _string(item, "input", where, allow_empty=True, fmt=record_format),
                "output": _string(item, "output", where, allow_empty=False, fmt=record_format),
            },
        )
    if record_format == ALPACA:
        instruction = _string(item, "instruction", where, allow_empty=False, fmt=record_format)
        extra = item.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f'{where}: "input" must be a string, got {type(extra).__name__}')
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        output = _string(item, "output", where, allow_empty=False, fmt=record_format)
        return (
            record_format,
            kind,
            {
                "system": None,
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}],
            },
        )
    if record_format == SHAREGPT:
        return record_format, kind, _conversation(_from_sharegpt(item, where), where)
    if "messages" not in item:
        raise DataError(
            f'{where} is not in the {FORMAT_NAMES["openai"]} format: it has no "messages" (keys: {sorted(item)})',
            "fix the record, or pass --dataset-format auto to detect its format",
        )
    return record_format, kind, _conversation(item, where)


def _from_sharegpt(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A ShareGPT record as an OpenAI-style one: ``from``/``value`` turns become ``role``/``content`` messages.

    ``function_call`` turns (a JSON ``{"name", "arguments"}``) become the assistant's tool calls; a top-level
    ``system`` and ``tools`` (a list, or JSON text of one, as some ShareGPT sets store it) are kept.
    """
    if "conversations" in item:
        turns = item["conversations"]
    elif _sharegpt_messages(item.get("messages")):
        turns = item["messages"]
    else:
        raise DataError(
            f'{where} is not in the {FORMAT_NAMES[SHAREGPT]} format: it has no "conversations" list of '
            f'{{"from", "value"}} turns (keys: {sorted(item)})',
            "fix the record, or pass --dataset-format auto to detect its format",
        )
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f'{where}: "conversations" must be a non-empty list of {{"from", "value"}} objects',
            "fix the record",
        )
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f'{where}: turn {i} must be an object with "from" and "value"')
        # {"conversations": [{"role", "content"}]}: OpenAI turns (rows read through Arrow carry absent keys as None)
        if turn.get("from") is None and turn.get("role") is not None:
            messages.append(turn)
            continue
        speaker, value = turn.get("from"), turn.get("value")
        if speaker not in SHAREGPT_ROLES:
            raise DataError(
                f"{where}: turn {i} is from {speaker!r}; ShareGPT speakers are {', '.join(SHAREGPT_ROLES)}",
                "fix the record",
            )
        if not isinstance(value, str):
            raise DataError(f'{where}: turn {i} "value" must be a string, got {type(value).__name__}')
        turn_weight = (
            {} if turn.get("weight") is None else {"weight": turn["weight"]}
        )  # checked with the turn
        if speaker == "function_call":
            try:
                call = json.loads(value)
            except ValueError as exc:
                raise DataError(
                    f'{where}: turn {i} is a function_call whose value is not JSON {{"name", "arguments"}} ({exc})'
                ) from exc
            calls = call if isinstance(call, list) else [call]  # a list: parallel calls
            messages.append({"role": "assistant", "content": "", "tool_calls": calls, **turn_weight})
        else:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": value, **turn_weight})
    record: dict[str, Any] = {"messages": messages}
    if item.get("system") is not None:
        record["system"] = item["system"]
    tools = item.get("tools")
    if isinstance(tools, str) and tools.strip():
        try:
            tools = json.loads(tools)
        except ValueError as exc:
            raise DataError(f'{where}: "tools" is text that is not JSON ({exc})') from exc
    if tools:
        record["tools"] = tools
    return record


def _string(item: dict[str, Any], key: str, where: str, allow_empty: bool, fmt: str = "lmflow") -> str:
    if key not in item:
        if fmt != "lmflow":
            raise DataError(
                f'{where} is not in the {FORMAT_NAMES[fmt]} format: it has no "{key}" (keys: {sorted(item)})',
                "fix the record, or pass --dataset-format auto to detect its format",
            )
        raise DataError(f'{where} has no "{key}"', "add it or fix the dataset type")
    value = item[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" must be a string, got {type(value).__name__}')
    if not allow_empty and not value.strip():
        raise DataError(f'{where}: "{key}" is empty', "remove the record or fill it in")
    return value


def _conversation(item: dict[str, Any], where: str, trained: bool = True) -> dict[str, Any]:
    """A conversation record: system prompt, messages (tool calls and results included) and tools.

    Tool calls and tool definitions are stored as JSON text, so that records with different tool schemas
    fit in one dataset table. ``trained=False`` reads a conversation that need not hold an assistant message
    (the prompt of a preference pair).
    """
    messages = item.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    system = item.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f'{where}: "system" must be a string, got {type(system).__name__}')
    clean = []
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or "role" not in message
            or ("content" not in message and "tool_calls" not in message)
        ):
            raise DataError(f'{where}: message {i} must be an object with "role" and "content"')
        role, content = message["role"], message.get("content")
        role = _ROLE_ALIASES.get(role, role)
        weight = message.get("weight")
        if weight is not None and weight != 1:
            # OpenAI's fine-tuning format (and ShareGPT sets after it) mark turns not to train with weight 0.
            raise DataError(
                f"{where}: message {i} has weight {weight!r}; lmflow trains every assistant message, so a turn "
                "marked not to be trained would be trained",
                "remove the weight-0 turns (or the records holding them), or set their weight to 1",
            )
        if role not in ("system", "user", "assistant", "tool"):
            raise DataError(
                f"{where}: message {i} has unknown role {role!r}; expected user, assistant, system or tool"
            )
        calls = message.get("tool_calls")
        if calls is not None:
            calls = _tool_calls(calls, f"{where}: message {i}")
            if role != "assistant":
                raise DataError(
                    f"{where}: message {i} has tool calls but only assistant messages can make them"
                )
        if content is None and calls:
            content = ""
        if isinstance(content, list):
            content = _text_of_parts(content, f"{where}: message {i}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} content must be a string, got {type(content).__name__}")
        if role == "system":
            if i != 0 or system is not None:
                raise DataError(
                    f'{where}: message {i} is a system message; only one, as the first message or as "system"',
                )
            system = content
            continue
        entry = {"role": role, "content": content}
        if calls:
            entry["tool_calls"] = json.dumps(calls, ensure_ascii=False)
        clean.append(entry)
    if trained and not any(m["role"] == "assistant" for m in clean):
        raise DataError(
            f"{where} has no assistant message, so nothing in it would be trained", "remove the record"
        )
    record: dict[str, Any] = {"system": system, "messages": clean}
    tools = item.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise DataError(f'{where}: "tools" must be a list of function definitions (JSON objects)')
        record["tools"] = json.dumps(tools, ensure_ascii=False)
    return record


def _text_of_parts(parts: list[Any], where: str) -> str:
    """The text of OpenAI content parts (``[{"type": "text", "text": ...}]``), joined as the models' own chat
    templates join them (no separator). A part that is not text (an image, audio, a file) is an error: a
    text model cannot be trained on it."""
    texts = []
    for n, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind is None or kind in _TEXT_PARTS:
            raise DataError(f'{where}: content part {n} must be {{"type": "text", "text": "..."}}')
        else:
            raise DataError(
                f"{where}: content part {n} is {kind!r}, which a text model cannot be trained on",
                "remove the part (only text parts are read), or train a vision-language model with "
                "--plugins multimodal",
            )
    return "".join(texts)


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """Check OpenAI-style tool calls; returns ``[{"name", "arguments"}]`` with arguments parsed from JSON text."""
    if not isinstance(calls, list):
        raise DataError(f'{where}: "tool_calls" must be a list')
    out = []
    for n, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f'{where}: tool call {n} needs a "name" (or "function": {{"name", "arguments"}})')
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as exc:
                raise DataError(
                    f"{where}: tool call {n} has arguments that are not valid JSON ({exc})"
                ) from exc
        out.append({"name": function["name"], "arguments": arguments})
    return out


# --------------------------------------------------------------------------------------------------------------
# Preference pairs
# --------------------------------------------------------------------------------------------------------------


def _checked_conversations(record: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The whole conversations a record holds: itself, or a pair's prompt followed by each answer."""
    if "chosen" in record:
        return [record["messages"] + record["chosen"], record["messages"] + record["rejected"]]
    return [record["messages"]]


def _pair(item: dict[str, Any], where: str, declared: str | None) -> tuple[str, dict[str, Any]]:
    """A preference pair: ``(type, record)``.

    Accepted shapes (``chosen`` and ``rejected`` always; the prompt in one of three ways):

    * text: ``{"prompt"?: str, "chosen": str, "rejected": str}`` -> ``paired_text2text``
      ``{"prompt", "chosen", "rejected"}``; without a prompt, the texts' common beginning is the prompt
      (Anthropic HH: ``"\n\nHuman: ...\n\nAssistant: ..."``);
    * messages: ``{"prompt" or "messages": [messages] or str, "chosen", "rejected"}`` where each answer is a
      string, a message or a list of messages (Hugging Face's preference layout) -> ``paired_conversation``
      ``{"system", "messages" (the prompt), "chosen", "rejected" (the answers' messages), "tools"?}``;
      without a prompt, both answers are whole conversations and their common first messages are the prompt;
    * the LMFlow ``paired_conversation`` type: ``{"chosen": {"system"?, "messages"}, "rejected": {...}}``.
    """
    if not isinstance(item, dict):
        raise DataError(f"{where} must be a JSON object, got {type(item).__name__}", "fix the record")
    for key in ("chosen", "rejected"):
        if item.get(key) is None:
            raise DataError(
                f'{where} is a preference pair without "{key}" (keys: {sorted(item)})',
                'give every pair a "chosen" and a "rejected" answer',
            )
    chosen, rejected = item["chosen"], item["rejected"]
    # Rows read through Arrow carry absent keys as None: a key counts only when it holds a value.
    prompt = item.get("prompt") if item.get("prompt") is not None else item.get("messages")
    conversational = any(item.get(key) is not None for key in ("messages", "system", "tools"))
    text = (
        isinstance(chosen, str) and isinstance(rejected, str) and (prompt is None or isinstance(prompt, str))
    )
    if declared == "paired_text2text" or (declared is None and text and not conversational):
        return "paired_text2text", _text_pair(item, where)
    if isinstance(chosen, dict) and isinstance(rejected, dict) and "messages" in chosen:
        # LMFlow's paired_conversation: two whole conversations
        whole = [
            _conversation(side, f"{where} ({key})")
            for key, side in (("chosen", chosen), ("rejected", rejected))
        ]
        if whole[0]["system"] != whole[1]["system"]:
            raise DataError(
                f'{where}: "chosen" and "rejected" have different system prompts', "give both the same"
            )
        return "paired_conversation", _split_pair(
            whole[0]["messages"], whole[1]["messages"], whole[0]["system"], whole[0].get("tools"), where
        )
    answers = []
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(side, str | dict):
            side = [side if isinstance(side, dict) else {"role": "assistant", "content": side}]
        if not isinstance(side, list) or not side:
            raise DataError(
                f'{where}: "{key}" must be a string, a message or a non-empty list of messages',
                "fix the record",
            )
        answers.append(side)
    starts = [side[0].get("role") if isinstance(side[0], dict) else None for side in answers]
    if prompt is not None and starts[0] not in (None, "assistant") and starts[1] == starts[0]:
        # The answers are whole conversations that repeat the prompt (UltraFeedback's layout): split those.
        prompt = None
    if prompt is None:  # implicit prompt: two whole conversations sharing their first messages
        whole = [
            _conversation(
                {"messages": side, "system": item.get("system"), "tools": item.get("tools")},
                f"{where} ({key})",
            )
            for key, side in (("chosen", answers[0]), ("rejected", answers[1]))
        ]
        if whole[0]["system"] != whole[1]["system"]:
            raise DataError(
                f'{where}: "chosen" and "rejected" have different system prompts', "give both the same"
            )
        return "paired_conversation", _split_pair(
            whole[0]["messages"], whole[1]["messages"], whole[0]["system"], whole[0].get("tools"), where
        )
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    head = _conversation(
        {"messages": prompt, "system": item.get("system"), "tools": item.get("tools")},
        f"{where} (prompt)",
        trained=False,
    )
    record = dict(head)
    for key, side in (("chosen", answers[0]), ("rejected", answers[1])):
        record[key] = _answer(side, f"{where} ({key})")
    _check_prompt(record["messages"], where)
    if record["chosen"] == record["rejected"]:
        raise DataError(
            f'{where}: "chosen" and "rejected" are the same answer, so there is nothing to prefer',
            "remove the pair or fix one of its answers",
        )
    return "paired_conversation", record


def _text_pair(item: dict[str, Any], where: str) -> dict[str, Any]:
    chosen = _string(item, "chosen", where, allow_empty=False, fmt=PREFERENCE)
    rejected = _string(item, "rejected", where, allow_empty=False, fmt=PREFERENCE)
    if item.get("prompt") is not None:
        if chosen == rejected:
            raise DataError(
                f'{where}: "chosen" and "rejected" are the same answer, so there is nothing to prefer',
                "remove the pair or fix one of its answers",
            )
        return {
            "prompt": _string(item, "prompt", where, allow_empty=True),
            "chosen": chosen,
            "rejected": rejected,
        }
    # No prompt: the texts' common beginning is the prompt; a space before the first difference starts the
    # answers (as tokenizers attach a space to the word after it).
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if n < min(len(chosen), len(rejected)):
        # Texts that part mid-word ("I can help" / "I cannot help") share the word's start, not the prompt.
        while n and chosen[n - 1].isalnum() and (chosen[n].isalnum() or rejected[n].isalnum()):
            n -= 1
        if n and chosen[n - 1] == " ":
            n -= 1
    if n == len(chosen) or n == len(rejected):
        raise DataError(
            f'{where}: "chosen" and "rejected" are the same text, or one begins the other, so no answer is left '
            "to compare",
            'give the answers that differ (with "prompt" holding what they share)',
        )
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _answer(messages: list[Any], where: str) -> list[dict[str, Any]]:
    """An answer's messages (assistant turns, tool results between them), checked like a conversation's."""
    checked = _conversation({"messages": messages}, where, trained=False)
    if checked["system"] is not None:
        raise DataError(f"{where}: an answer cannot hold a system message", "put it in the prompt")
    if checked["messages"][0]["role"] != "assistant":
        raise DataError(
            f"{where}: the answer begins with a {checked['messages'][0]['role']} message, not the assistant's",
            "put everything before the assistant's answer in the prompt",
        )
    return checked["messages"]


def _check_prompt(messages: list[dict[str, Any]], where: str) -> None:
    if not messages:
        raise DataError(f"{where}: the prompt holds no message", "give the pair a prompt")
    if messages[-1]["role"] == "assistant":
        raise DataError(
            f"{where}: the prompt ends with an assistant message, so the answers would continue it",
            "end the prompt with the user's (or a tool's) message",
        )


def _split_pair(
    chosen: list[dict[str, Any]], rejected: list[dict[str, Any]], system: str | None, tools: Any, where: str
) -> dict[str, Any]:
    """Two whole conversations as a prompt (their common first messages) and two answers."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1]["role"] == "assistant":  # an answer starts with the assistant's turn
        n -= 1
    if n == len(chosen) or n == len(rejected):
        raise DataError(
            f'{where}: "chosen" and "rejected" are the same conversation, or one begins the other',
            "give two conversations that differ in the assistant's last answer",
        )
    record: dict[str, Any] = {"system": system, "messages": chosen[:n]}
    for key, side in (("chosen", chosen[n:]), ("rejected", rejected[n:])):
        if side[0]["role"] != "assistant":
            raise DataError(
                f'{where}: "chosen" and "rejected" differ before the assistant\'s answer (in a {side[0]["role"]} '
                "message)",
                'give both the same prompt, or write the pair with "prompt", "chosen" and "rejected"',
            )
        record[key] = side
    _check_prompt(record["messages"], where)
    if tools is not None:
        record["tools"] = tools
    return record
