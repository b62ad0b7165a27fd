"""Tokenization with loss masks, truncation to the block size, and the on-disk cache.

Every example gets ``input_ids``, ``labels`` (-100 where no loss is taken) and ``attention_mask``:

* ``text_only``: all tokens are trained; texts end with EOS. With ``group_texts`` they are concatenated and cut
  into block-size chunks (the last chunk is kept, shorter), so nothing is truncated.
* ``text2text``: the input is not trained, the output and the EOS after it are.
* ``conversation``: the template decides (assistant turns and their end-of-turn marker are trained).
* ``paired_text2text`` and ``paired_conversation`` (preference pairs): the chosen answer in ``input_ids``,
  ``labels``, ``attention_mask``, the rejected one in ``rejected_input_ids``, ``rejected_labels``,
  ``rejected_attention_mask``; each is the prompt (never trained) followed by the answer (trained), tokenized as
  ``text2text`` and ``conversation`` records are. Only the answers are trained: assistant turns inside a
  multi-turn prompt are not.

Examples longer than the block size are truncated and counted; examples left with no trained token are
dropped and counted. Both counts are reported, never silent. Tokenization runs a batch of records at a time in
forked processes that write Arrow files (handed on memory-mapped, see :func:`tokenize_dataset`) and is cached
under ``$LMFLOW_CACHE`` (default ``~/.cache/lmflow``), keyed by the records' content, the tokenizer, the
template and the settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, LmflowError
from ..templates import Conversation, Segment, Template, encode_segments, render_text
from .formats import PAIRED_TYPES, RawDataset
from .store import COLUMN as RECORD_COLUMN
from .store import (
    Records,
    RecordWriter,
    cache_root,
    commit,
    entry_lock,
    records_progress,
    scratch_dir,
    staging_dir,
)

#: Datasets of fewer records are tokenized in one process by default.
PARALLEL_FROM = 10_000

CACHE_FORMAT = "lmflow-data-v6"  # bump when tokenization changes, so old caches are not reused
IGNORE_INDEX = -100
TEXT_FIELDS = ("text", "input", "output", "system", "messages", "tools", "prompt", "chosen", "rejected")
#: The columns of the rejected answer of a preference pair (the chosen one is in input_ids/labels).
REJECTED_COLUMNS = ("rejected_input_ids", "rejected_labels", "rejected_attention_mask")


@dataclass
class DataStats:
    """What tokenization did to a dataset; printed by ``lmflow data check`` and at the start of a run.

    ``truncated`` counts the examples longer than the block size (each once); ``dropped_untrained`` counts the
    examples removed for having no trained token, most of them truncated ones, so the two overlap and are
    never added.
    """

    type: str
    records: int
    examples: int
    block_size: int
    truncated: int = 0
    dropped_untrained: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    length_min: int = 0
    length_mean: float = 0.0
    length_median: float = 0.0
    length_p95: int = 0
    length_max: int = 0
    max_token_id: int = -1
    converted: dict[str, int] = field(default_factory=dict)
    cached: bool = False
    #: Wall time of the tokenization (not of reading the records) and the processes that did it.
    seconds: float = 0.0
    workers: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenization_workers(requested: int | None, records: int) -> int:
    """How many processes tokenize ``records`` records: ``requested``, by default the cores available (one for
    fewer than :data:`PARALLEL_FROM` records, where starting processes costs more than it saves); never more
    than one per record."""
    if requested is None:
        requested = available_cores() if records >= PARALLEL_FROM else 1
    return max(1, min(requested, records))


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


#: Renders a conversation: ``(template, conversation, add_generation_prompt=False) -> segments``.
Formatter = Callable[..., list[Segment]]


def tokenize_dataset(
    raw: RawDataset,
    tokenizer: Any,
    block_size: int,
    template: Template | None = None,
    format_conversation: Formatter | None = None,
    group_texts: bool = True,
    cache_extra: str = "",
    use_cache: bool = True,
    truncate: bool = True,
    workers: int | None = None,
) -> tuple[Any, DataStats]:
    """Tokenize ``raw`` into a ``datasets.Dataset`` of ``input_ids``, ``labels``, ``attention_mask``.

    The examples are written to Arrow files batch by batch (by ``workers`` processes) and handed back
    memory-mapped: memory holds a batch per process, never the dataset. With ``use_cache`` the files are the
    cache entry (``$LMFLOW_CACHE/datasets/KEY``); one process prepares an entry while others asking for it
    wait, then read it.

    Args:
        format_conversation: renders a conversation with the template (the ``format_conversation`` hook);
            defaults to ``template.render``.
        cache_extra: anything else the result depends on (e.g. plugins that format conversations).
        truncate: cut examples to ``block_size`` (training); ``False`` keeps every example whole and
            ungrouped (scoring, where long texts are read with a sliding window).
        workers: processes that tokenize (see :func:`tokenization_workers`; ``None``: automatic).

    Returns the dataset and its :class:`DataStats`.
    """
    if raw.uses_template and template is None:
        raise ValueError("conversation data needs a template")
    key = _cache_key(raw, tokenizer, block_size, template, group_texts, cache_extra + f"|truncate={truncate}")
    cache_dir = cache_root() / key
    with entry_lock(key) if use_cache else contextlib.nullcontext():
        if use_cache and (cache_dir / "stats.json").is_file():
            try:
                data, stats = _load_examples(cache_dir)
            except (OSError, ValueError, KeyError, TypeError):  # a damaged entry is prepared again
                pass
            else:
                # Records of two formats can normalise alike (ShareGPT and its OpenAI twin) and share an entry.
                stats.cached, stats.converted = True, dict(raw.converted)
                return data, stats
        try:
            staging = staging_dir(cache_root()) if use_cache else scratch_dir()
        except OSError:  # the cache cannot be written
            staging, use_cache = scratch_dir(), False
        try:
            stats = _tokenize(
                raw,
                tokenizer,
                block_size,
                template,
                format_conversation,
                group_texts,
                truncate,
                workers,
                staging,
            )
            release_memory()  # what tokenizing in this process allocated goes back to the system
            if not use_cache:
                return _load_examples(staging)[0], stats
            commit(staging, cache_dir)
        finally:
            if use_cache:
                shutil.rmtree(staging, ignore_errors=True)
        data, stats = _load_examples(cache_dir)
    return data, stats


def _tokenize(
    raw: RawDataset,
    tokenizer: Any,
    block_size: int,
    template: Template | None,
    format_conversation: Formatter | None,
    group_texts: bool,
    truncate: bool,
    workers: int | None,
    directory: Path,
) -> DataStats:
    """Tokenize ``raw`` into ``directory`` (``data/*.arrow``, ``stats.json``, ``layout.json``)."""
    import json

    render = format_conversation or (
        lambda t, c, add_generation_prompt=False: t.render(c, add_generation_prompt, tokenizer)
    )
    paired = raw.type in PAIRED_TYPES
    grouping = raw.type == "text_only" and group_texts and truncate
    # Columns a plugin's normalize_record added (e.g. image paths) travel with their examples; each example
    # then also keeps ``full_length``, its token count before the cut.
    names = record_columns(raw)  # once: for records given as a list this goes through all of them
    extra = [c for c in names if c not in TEXT_FIELDS]
    keep_full_length = truncate and not grouping and bool(extra)
    types = _column_types(raw, extra)
    eos = tokenizer.eos_token_id
    started = time.monotonic()

    def encode(batch: dict[str, list]) -> dict[str, list]:
        if paired:
            return _encode_pairs(batch, raw.type, tokenizer, template, render)
        if raw.type == "conversation":
            tools = batch.get("tools") or [None] * len(batch["messages"])
            rendered = [
                render(template, Conversation.from_messages(messages, system, tool_list))
                for messages, system, tool_list in zip(batch["messages"], batch["system"], tools)
            ]
            ids, labels = encode_segments(tokenizer, rendered, template)
        elif raw.type == "text2text":
            prompts = tokenizer(batch["input"], add_special_tokens=True)["input_ids"]
            answers = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
            ids, labels = [], []
            for prompt, answer in zip(prompts, answers):
                answer = _with_eos(answer, eos)
                ids.append(prompt + answer)
                labels.append([IGNORE_INDEX] * len(prompt) + answer)
        else:
            ids = [_with_eos(x, eos) for x in tokenizer(batch["text"], add_special_tokens=True)["input_ids"]]
            labels = [_untrained_bos(x, tokenizer) for x in ids]
        return {"input_ids": ids, "labels": labels, "_full_length": [len(x) for x in ids]}

    def finish(batch: dict[str, list]) -> dict[str, list]:
        """Cut to the block size; add the attention mask and the per-example numbers the stats need."""
        full = batch.pop("_full_length")  # counted before the cut
        if grouping:
            batch = _group({key: batch[key] for key in ("input_ids", "labels")}, block_size)
        elif truncate:
            for key in ("input_ids", "labels") + (REJECTED_COLUMNS[:2] if paired else ()):
                batch[key] = [x[:block_size] for x in batch[key]]
        ids = batch["input_ids"]
        batch["attention_mask"] = [[1] * len(x) for x in ids]
        batch["_trained"] = [len(x) - x.count(IGNORE_INDEX) for x in batch["labels"]]
        batch["_max_id"] = [max(x, default=-1) for x in ids]
        batch["_length"] = [len(x) for x in ids]
        if paired:  # a pair's trained tokens are both answers'; it is kept only when each answer has one
            rejected = batch["rejected_input_ids"]
            batch["rejected_attention_mask"] = [[1] * len(x) for x in rejected]
            rejected_trained = [len(x) - x.count(IGNORE_INDEX) for x in batch["rejected_labels"]]
            batch["_trained"] = [n + m if n and m else 0 for n, m in zip(batch["_trained"], rejected_trained)]
            batch["_max_id"] = [max(m, max(x, default=-1)) for m, x in zip(batch["_max_id"], rejected)]
            batch["_length"] = [n + len(x) for n, x in zip(batch["_length"], rejected)]
        if keep_full_length:  # a plugin's columns may need to know what the cut removed (image tokens...)
            batch["full_length"] = full
        # The records' lengths before the cut, for the statistics: with grouping the rows are blocks, so a
        # batch's lengths ride on its first block.
        batch["_full_lengths"] = [full] + [[] for _ in ids[1:]] if grouping else [[n] for n in full]
        return batch

    def work(batch: dict[str, list]) -> dict[str, Any]:
        records = [json.loads(text) for text in batch[RECORD_COLUMN]]
        columns = {name: [r.get(name) for r in records] for name in names}
        encoded = encode(columns)
        for name in extra:
            encoded[name] = columns[name]
        return _typed(finish(encoded), types)

    records = _source(raw, directory)
    processes = tokenization_workers(workers, len(records))
    (directory / "data").mkdir(parents=True, exist_ok=True)
    _encode_batches(records, work, directory / "data", processes)
    mapped = _load_parts(directory)
    stats = _statistics(mapped, raw, block_size, grouping, truncate)
    stats.workers = processes
    stats.seconds = round(time.monotonic() - started, 2)
    (directory / "stats.json").write_text(json.dumps(stats.to_dict()))
    # With plugin columns the untrained examples stay until the plugins' prepare_dataset has seen them (a cut
    # image: an error naming the record); the pipeline drops them after it (drop_untrained).
    (directory / "layout.json").write_text(json.dumps({"drop_untrained": not keep_full_length}))
    del mapped
    return stats


def record_columns(raw: RawDataset) -> list[str]:
    """The top-level keys of ``raw``'s records (of any record: a plugin's key may be absent from some)."""
    if raw.columns is not None:
        return list(raw.columns)
    names: dict[str, None] = {}
    for record in raw.records:
        names.update(dict.fromkeys(record))
    return list(names)


def _source(raw: RawDataset, directory: Path) -> Records:
    """``raw``'s records as an Arrow file of JSON texts: the one they were read into, or (records given as a
    list) one written here."""
    if isinstance(raw.records, Records):
        return raw.records
    writer = RecordWriter(directory / "records.arrow")
    for i, record in enumerate(raw.records):
        writer.add(record, f"record {i}")
    writer.close()
    return Records(directory / "records.arrow")


#: Record batches one task tokenizes (one output file each): small enough for an even share among the
#: processes and a live progress bar, large enough that a million records make a hundred files or so.
TASK_BATCHES = 8
_JOB: dict[
    str, Any
] = {}  # the task's function and files, inherited by forked workers (closures do not pickle)


def _encode_batches(records: Records, work: Callable, directory: Path, processes: int) -> None:
    """Run ``work`` on every batch of ``records``, writing the results to ``directory/examples-NNNNNN.arrow``
    (in order), with ``processes`` forked processes; each reads its batches from the file and writes its own
    files, so memory holds a few batches per process whatever the dataset's size."""
    import multiprocessing

    tasks = [
        (n, first, first + TASK_BATCHES) for n, first in enumerate(range(0, records.batches, TASK_BATCHES))
    ]
    _JOB.update(work=work, records=records, directory=directory)
    progress = records_progress(len(records), "Tokenizing")
    try:
        if processes > 1 and len(tasks) > 1 and "fork" in multiprocessing.get_all_start_methods():
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer's threads do not fork
            context = multiprocessing.get_context("fork")
            with _frozen_heap(), context.Pool(min(processes, len(tasks))) as pool:
                outcomes = pool.imap_unordered(_encode_task, tasks)
                _collect(outcomes, progress)
        else:
            _collect(map(_encode_task, tasks), progress)
    finally:
        _JOB.clear()
        progress.close()


def _collect(outcomes: Any, progress: Any) -> None:
    done = 0
    for outcome in outcomes:
        if outcome[0] == "error":  # a user's problem found in a worker: raised here as it was there
            raise DataError(outcome[1], outcome[2])
        done += outcome[1]
        progress.show(done, done)


def _encode_task(task: tuple[int, int, int]) -> tuple[Any, ...]:
    """One task of :func:`_encode_batches`: ``("done", records)`` or ``("error", message, hint)``."""
    import pyarrow as pa

    number, first, stop = task
    work, records, directory = _JOB["work"], _JOB["records"], _JOB["directory"]
    path = directory / f"examples-{number:06d}.arrow"
    count, writer, sink, schema = 0, None, None, None
    try:
        for texts in records.texts(first, stop):
            table = work({RECORD_COLUMN: texts})
            if writer is None:
                schema, sink = table.schema, pa.OSFile(str(path), "wb")
                writer = pa.ipc.new_stream(sink, schema)
            writer.write_table(table if table.schema == schema else table.cast(schema))
            count += len(texts)
    except LmflowError as exc:
        return ("error", exc.message, exc.hint)
    finally:
        if writer is not None:
            writer.close()
        if sink is not None:
            sink.close()
    return ("done", count)


def _load_parts(directory: Path) -> Any:
    """The examples written to ``directory/data``, memory-mapped, in order."""
    import datasets

    files = sorted((directory / "data").glob("examples*.arrow"))
    if not files:
        raise ValueError("no examples")
    parts = [datasets.Dataset.from_file(str(f)) for f in files]
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


_TYPES = {
    "input_ids": "int32",
    "labels": "int32",
    "attention_mask": "int8",
    "rejected_input_ids": "int32",
    "rejected_labels": "int32",
    "rejected_attention_mask": "int8",
    "_full_lengths": "int64",
}


def _typed(batch: dict[str, list], types: dict[str, Any]) -> Any:
    """The batch as an Arrow table, token columns as lists of small integers (a token id fits 32 bits, a mask
    8): a third of the disk and page cache of the default 64-bit lists. A plugin's column gets the type of its
    first value in the dataset (``types``), so a batch where it is always absent has that type too."""
    import pyarrow as pa

    columns = {}
    for name, values in batch.items():
        if name in _TYPES:
            columns[name] = pa.array(values, pa.list_(getattr(pa, _TYPES[name])()))
        else:
            columns[name] = pa.array(values, types.get(name))
    return pa.table(columns)


def _column_types(raw: RawDataset, names: list[str]) -> dict[str, Any]:
    """The Arrow type of each of a plugin's columns ``names``: that of its first value that is not null."""
    import pyarrow as pa

    types: dict[str, Any] = {}
    if not names:
        return types
    for record in raw.records:
        for name in names:
            if name not in types and record.get(name) is not None:
                types[name] = pa.array([record[name]]).type
        if len(types) == len(names):
            break
    return types


def _statistics(mapped: Any, raw: RawDataset, block_size: int, grouping: bool, truncate: bool) -> DataStats:
    """The :class:`DataStats` of a tokenized dataset, from its Arrow columns (no Python list per example)."""
    import numpy as np
    import pyarrow.compute as pc

    table = mapped.data

    def column(name: str) -> Any:
        return table.column(name).to_numpy() if len(table) else np.zeros(0, dtype=np.int64)

    full = pc.list_flatten(table.column("_full_lengths")).to_numpy() if len(table) else np.zeros(0)
    trained, lengths = column("_trained"), column("_length")
    kept = trained > 0
    full = np.sort(full)
    stats = DataStats(
        type=raw.type,
        records=len(raw),
        examples=int(kept.sum()),
        block_size=block_size,
        converted=dict(raw.converted),
        truncated=0 if grouping or not truncate else int((full > block_size).sum()),
        dropped_untrained=int((~kept).sum()),
        trained_tokens=int(trained.sum()),
        tokens=int(lengths[kept].sum()),
        max_token_id=int(column("_max_id").max()) if len(table) else -1,
    )
    if len(full):
        stats.length_min, stats.length_max = int(full[0]), int(full[-1])
        stats.length_mean = round(float(full.mean()), 2)
        stats.length_median = float(np.median(full))
        if stats.length_median.is_integer():
            stats.length_median = int(stats.length_median)
        stats.length_p95 = int(full[min(len(full) - 1, int(0.95 * len(full)))])
    return stats


_INTERNAL = ["_trained", "_max_id", "_length", "_full_lengths"]


def _load_examples(directory: Path) -> tuple[Any, DataStats]:
    """The examples :func:`_tokenize` wrote to ``directory``, memory-mapped, and their statistics."""
    import json

    stats = DataStats(**json.loads((directory / "stats.json").read_text()))
    layout = json.loads((directory / "layout.json").read_text())
    data = _load_parts(directory)
    if stats.dropped_untrained and layout["drop_untrained"]:
        data = data.filter(
            lambda trained: [n > 0 for n in trained],
            input_columns=["_trained"],
            batched=True,
            batch_size=10_000,
            keep_in_memory=True,  # only the kept rows' indices
        )
    return data.remove_columns(_INTERNAL), stats


@contextlib.contextmanager
def _frozen_heap() -> Any:
    """While worker processes are forked: the objects this process holds are moved out of the garbage
    collector's reach (``gc.freeze``), so that collections in the workers do not write to them and copy the
    pages they share with this process (the workers' memory would otherwise grow toward this process's)."""
    import gc

    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release_memory() -> None:
    """Hand the memory the tokenizing passes freed back to the system: Arrow's pool keeps its pages, and glibc's
    allocator the freed heap (``malloc_trim``); without this a run holds them through training."""
    import ctypes
    import ctypes.util

    try:
        import pyarrow

        pyarrow.default_memory_pool().release_unused()
    except (ImportError, AttributeError):
        pass
    libc = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(libc).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to trim
        pass


def drop_untrained(dataset: Any) -> Any:
    """The examples of ``dataset`` with a trained token (in each answer, for preference pairs)."""
    columns = [c for c in ("labels", REJECTED_COLUMNS[1]) if c in dataset.column_names]

    def trained(batch: dict[str, list]) -> list[bool]:
        return [all(any(t != IGNORE_INDEX for t in row[c]) for c in columns) for row in _rows(batch, columns)]

    return dataset.filter(trained, batched=True, keep_in_memory=True, load_from_cache_file=False)


def _rows(batch: dict[str, list], columns: list[str]) -> list[dict[str, list]]:
    return [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]


def _encode_pairs(
    batch: dict[str, list], kind: str, tokenizer: Any, template: Template | None, render: Formatter
) -> dict[str, list]:
    """Token ids and labels of both answers of each preference pair (see the module docstring)."""
    out: dict[str, list] = {}
    if kind == "paired_text2text":
        prompts = tokenizer(batch["prompt"], add_special_tokens=True)["input_ids"]
        eos = tokenizer.eos_token_id
        for side, prefix in (("chosen", ""), ("rejected", "rejected_")):
            answers = tokenizer(batch[side], add_special_tokens=False)["input_ids"]
            ids = [prompt + _with_eos(answer, eos) for prompt, answer in zip(prompts, answers)]
            out[f"{prefix}input_ids"] = ids
            out[f"{prefix}labels"] = [
                [IGNORE_INDEX] * len(prompt) + x[len(prompt) :] for prompt, x in zip(prompts, ids)
            ]
    else:
        tools = batch.get("tools") or [None] * len(batch["messages"])
        for side, prefix in (("chosen", ""), ("rejected", "rejected_")):
            rendered = []
            for prompt, answer, system, tool_list in zip(
                batch["messages"], batch[side], batch["system"], tools
            ):
                whole = render(template, Conversation.from_messages(prompt + answer, system, tool_list))
                # The prompt's own rendering ends where the answer begins: nothing before it is trained.
                head = render_text(render(template, Conversation.from_messages(prompt, system, tool_list)))
                if not render_text(whole).startswith(head):
                    raise DataError(
                        f"template {template.name!r} renders a pair's prompt differently alone than followed by "
                        "its answer, so the prompt cannot be told apart from the answer",
                        "choose another --template for preference data",
                    )
                rendered.append(_untrained_prefix(whole, len(head)))
            ids, labels = encode_segments(tokenizer, rendered, template)
            out[f"{prefix}input_ids"], out[f"{prefix}labels"] = ids, labels
    out["_full_length"] = [max(len(c), len(r)) for c, r in zip(out["input_ids"], out["rejected_input_ids"])]
    return out


def _untrained_prefix(segments: list[Segment], chars: int) -> list[Segment]:
    """``segments`` with nothing trained in their first ``chars`` characters."""
    out, position = [], 0
    for segment in segments:
        end = position + len(segment.text)
        if segment.trained and position < chars:
            cut = min(chars, end) - position
            out.append(Segment(segment.text[:cut], False))
            if segment.text[cut:]:
                out.append(Segment(segment.text[cut:], True))
        else:
            out.append(segment)
        position = end
    return out


def _untrained_bos(ids: list[int], tokenizer: Any) -> list[int]:
    """Labels of a text: every token, except the BOS the tokenizer put first (a BOS is never trained)."""
    bos = tokenizer.bos_token_id
    if ids and bos is not None and ids[0] == bos and bos != tokenizer.eos_token_id:
        return [IGNORE_INDEX, *ids[1:]]
    return list(ids)


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    if eos is None or (ids and ids[-1] == eos):
        return list(ids)
    return [*ids, eos]


def _group(batch: dict[str, list], block_size: int) -> dict[str, list]:
    """Concatenate the examples of a batch and cut them into chunks of ``block_size`` tokens."""
    out: dict[str, list] = {}
    for key, values in batch.items():
        flat = [t for x in values for t in x]
        out[key] = [flat[i : i + block_size] for i in range(0, len(flat), block_size)]
    return out


def _cache_key(
    raw: RawDataset, tokenizer: Any, block_size: int, template: Template | None, group: bool, extra: str
) -> str:
    """What the tokenized data depends on: the records themselves (their fingerprint: a hash of their content
    taken as they were read), the tokenizer, template and settings."""
    import json

    from datasets.fingerprint import Hasher

    digest = hashlib.sha256()
    for part in (CACHE_FORMAT, raw.type, str(block_size), str(group), extra, repr(template)):
        digest.update(part.encode() + b"\0")
    if raw.fingerprint is not None:
        digest.update(raw.fingerprint.encode())
    else:
        for record in raw.records:
            digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\0")
    digest.update(Hasher.hash(tokenizer).encode())
    return digest.hexdigest()[:32]
