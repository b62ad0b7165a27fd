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

Every record is checked; the first malformed one stops the run with an error naming its file and index.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..inputs import DATASET_FILE_LIMIT, read_input_text
from ..templates import Conversation, Template, TemplateError

TYPES = ("text_only", "text2text", "conversation")
ALPACA = "alpaca"
#: Names of the files a dataset is read from, compared in lower case; longest first, so ``.jsonl.gz`` wins.
SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json")
_SUFFIX_NAMES = ".json or .jsonl file (optionally gzipped: .json.gz, .jsonl.gz)"
_READ_NAMES = ".json, .jsonl, .json.gz and .jsonl.gz"
#: Nesting that no real record reaches; where a file nests deeper than Python parses, the error shows the spot.
MAX_DEPTH = 500
_KEYS_TO_TYPE = (
    ("messages", "conversation"),
    ("instruction", ALPACA),
    ("text", "text_only"),
    ("input", "text2text"),
    ("output", "text2text"),
)


@dataclass
class RawDataset:
    """Validated records of one dataset, normalised to its type's shape.

    ``records`` hold ``{"text"}`` (text_only), ``{"input", "output"}`` (text2text) or ``{"system",
    "messages"}`` (conversation, Alpaca records included). ``origins[i]`` names where record ``i`` came from.
    """

    type: str
    records: list[dict[str, Any]]
    files: list[Path]
    origins: list[str] = field(default_factory=list)
    converted: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.records)


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
) -> RawDataset:
    """Read and validate every record of the dataset at ``path``.

    Args:
        template: when given, every conversation is also checked against it (roles, order, system prompt).
        max_samples: keep only the first N records (after validation of those N).
        normalize: the ``normalize_record`` hook: ``(record, declared_type, where)`` -> ``(type, record)`` for
            record shapes a plugin understands, or ``None`` for the core's own formats.

    Raises:
        DataError: naming the file and record index of the first problem.
    """
    files, skipped = _scan(Path(path).expanduser())
    if skipped:
        from ..report import note

        verb = "is" if len(skipped) == 1 else "are"
        note(f"dataset directory {path}: {_listing(skipped)} {verb} not read (only {_READ_NAMES} files are)")
    dataset: RawDataset | None = None
    for file in files:
        kind, items = _read_file(file)
        for label, item in items:
            if max_samples is not None and dataset is not None and len(dataset) >= max_samples:
                break
            where = f"{file}: {label}"
            try:
                custom = normalize(item, kind, where) if normalize is not None else None
                record_type, record = custom if custom is not None else _normalise(item, kind, where)
            except RecursionError:
                raise DataError(
                    f"{where} is nested too deeply to read",
                    "flatten the record (real records nest a few levels)",
                ) from None
            if _base_type(record_type) not in TYPES:
                raise DataError(f"{where}: a plugin returned the unknown record type {record_type!r}")
            if dataset is None:
                dataset = RawDataset(_base_type(record_type), [], files)
            elif _base_type(record_type) != dataset.type:
                raise DataError(
                    f"{where} is a {record_type} record but earlier records are {dataset.type}",
                    "a dataset holds one type of record; split it into separate datasets",
                )
            if record_type == ALPACA:
                dataset.converted[ALPACA] += 1
            if template is not None and dataset.type == "conversation":
                try:
                    template.check(
                        Conversation.from_messages(record["messages"], record["system"], record.get("tools"))
                    )
                except TemplateError as exc:
                    raise DataError(
                        f"{where}: {exc.message}", exc.hint or "fix the record or choose another --template"
                    ) from exc
            dataset.records.append(record)
            dataset.origins.append(where)
    if dataset is None or not dataset.records:
        raise DataError(f"dataset {path} holds no records", "add records or check the path")
    return dataset


def _read_file(file: Path) -> tuple[str | None, list[tuple[str, Any]]]:
    """``(declared type or None, [(label, item), ...])`` of one file; labels say where an item is."""
    text = read_input_text(
        file, "dataset", "pass a regular .json or .jsonl file", DataError, DATASET_FILE_LIMIT, decompress=True
    )
    if (data_suffix(file) or "").startswith(".jsonl"):
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{file}: line {number} is not valid JSON ({exc.msg})", "fix that line"
                ) from exc
            except RecursionError:
                raise _too_deep(file, line, f"line {number}") from None
        return None, items
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{file} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", "fix the syntax"
        ) from exc
    except RecursionError:
        raise _too_deep(file, text) from None
    if isinstance(data, list):
        return None, [(f"record {i}", item) for i, item in enumerate(data)]
    if isinstance(data, dict) and "instances" in data:
        kind = data.get("type")
        if kind not in TYPES:
            raise DataError(
                f'{file}: "type" is {kind!r}; expected one of {", ".join(TYPES)}',
                "set the dataset type at the top of the file",
            )
        if not isinstance(data["instances"], list):
            raise DataError(f'{file}: "instances" must be a list of records')
        return kind, [(f"instance {i}", item) for i, item in enumerate(data["instances"])]
    raise DataError(
        f'{file} is neither an LMFlow dataset ({{"type", "instances"}}) nor a list of records',
        "see README, Data formats",
    )


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


def _infer_type(item: dict[str, Any]) -> str | None:
    for key, kind in _KEYS_TO_TYPE:
        if key in item:
            return kind
    return None


def _normalise(item: Any, declared: str | None, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(item, dict):
        raise DataError(f"{where} must be a JSON object, got {type(item).__name__}", "fix the record")
    kind = declared or _infer_type(item)
    if kind is None:
        raise DataError(
            f'{where} has keys {sorted(item)}; expected "text", "input"/"output", "messages" or '
            '"instruction"/"output"',
            "see README, Data formats",
        )
    if kind == "text_only":
        return kind, {"text": _string(item, "text", where, allow_empty=False)}
    if kind == "text2text":
        return kind, {
            "input": _string(item, "input", where, allow_empty=True),
            "output": _string(item, "output", where, allow_empty=False),
        }
    if kind == ALPACA:
        instruction = _string(item, "instruction", where, allow_empty=False)
        extra = item.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f'{where}: "input" must be a string, got {type(extra).__name__}')
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        output = _string(item, "output", where, allow_empty=False)
        return kind, {
            "system": None,
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}],
        }
    return kind, _conversation(item, where)


def _string(item: dict[str, Any], key: str, where: str, allow_empty: bool) -> str:
    if key not in item:
        raise DataError(f'{where} has no "{key}"', "add it or fix the dataset type")
    value = item[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" must be a string, got {type(value).__name__}')
    if not allow_empty and not value.strip():
        raise DataError(f'{where}: "{key}" is empty', "remove the record or fill it in")
    return value


def _conversation(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A conversation record: system prompt, messages (tool calls and results included) and tools.

    Tool calls and tool definitions are stored as JSON text, so that records with different tool schemas
    fit in one dataset table.
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
    if not any(m["role"] == "assistant" for m in clean):
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
