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
dropped and counted. Both counts are reported, never silent. Tokenization runs batched through ``datasets``
and is cached under ``$LMFLOW_CACHE`` (default ``~/.cache/lmflow``), keyed by the records' content, the
tokenizer, the template and the settings.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..templates import Conversation, Segment, Template, encode_segments, render_text
from .formats import PAIRED_TYPES, RawDataset

CACHE_FORMAT = "lmflow-data-v5"  # bump when tokenization changes, so old caches are not reused
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
    """How many processes tokenize ``records`` records: ``requested`` (default one), never more than one per
    record. One is the default because the tokenized examples travel back from the worker processes in
    memory: on two cores, 20,000 conversations took 20.5 s with two processes and 19.0 s with one."""
    return max(1, min(requested or 1, records))


def cache_root() -> Path:
    """Where tokenized datasets are cached (``$LMFLOW_CACHE/datasets``)."""
    base = os.environ.get("LMFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmflow")
    return Path(base) / "datasets"


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

    Args:
        format_conversation: renders a conversation with the template (the ``format_conversation`` hook);
            defaults to ``template.render``.
        cache_extra: anything else the result depends on (e.g. plugins that format conversations).
        truncate: cut examples to ``block_size`` (training); ``False`` keeps every example whole and
            ungrouped (scoring, where long texts are read with a sliding window).
        workers: processes that tokenize (see :func:`tokenization_workers`; ``None``: automatic).

    Returns the dataset and its :class:`DataStats`.
    """
    import datasets

    if raw.uses_template and template is None:
        raise ValueError("conversation data needs a template")
    render = format_conversation or (
        lambda t, c, add_generation_prompt=False: t.render(c, add_generation_prompt, tokenizer)
    )
    paired = raw.type in PAIRED_TYPES
    key = _cache_key(raw, tokenizer, block_size, template, group_texts, cache_extra + f"|truncate={truncate}")
    cache_dir = cache_root() / key
    if use_cache and (cache_dir / "stats.json").is_file():
        import json

        stats = DataStats(**json.loads((cache_dir / "stats.json").read_text()))
        # Records of two formats can normalise alike (ShareGPT and its OpenAI twin) and share a cache entry.
        stats.cached, stats.converted = True, dict(raw.converted)
        return datasets.load_from_disk(str(cache_dir / "data")), stats

    started = time.monotonic()
    eos = tokenizer.eos_token_id

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
        if grouping:
            batch = {key: batch[key] for key in ("input_ids", "labels")}
            batch = _group(batch, block_size)
        elif not truncate:
            batch = dict(batch)
        else:
            batch = dict(batch)
            for key in ("input_ids", "labels") + (REJECTED_COLUMNS[:2] if paired else ()):
                batch[key] = [x[:block_size] for x in batch[key]]
        full = batch.pop("_full_length", None)  # counted before the cut
        if keep_full_length:  # a plugin's columns may need to know what the cut removed (image tokens...)
            batch["full_length"] = full
        ids = batch["input_ids"]
        batch["attention_mask"] = [[1] * len(x) for x in ids]
        batch["_trained"] = [sum(t != IGNORE_INDEX for t in x) for x in batch["labels"]]
        batch["_max_id"] = [max(x, default=-1) for x in ids]
        batch["_length"] = [len(x) for x in ids]
        if paired:  # a pair's trained tokens are both answers'; it is kept only when each answer has one
            rejected = batch["rejected_input_ids"]
            batch["rejected_attention_mask"] = [[1] * len(x) for x in rejected]
            rejected_trained = [sum(t != IGNORE_INDEX for t in x) for x in batch["rejected_labels"]]
            batch["_trained"] = [n + m if n and m else 0 for n, m in zip(batch["_trained"], rejected_trained)]
            batch["_max_id"] = [max(m, max(x, default=-1)) for m, x in zip(batch["_max_id"], rejected)]
            batch["_length"] = [n + len(x) for n, x in zip(batch["_length"], rejected)]
        return batch

    grouping = raw.type == "text_only" and group_texts and truncate
    source = datasets.Dataset.from_list(raw.records)
    # Columns a plugin's normalize_record added (e.g. image paths) travel with their examples.
    text_columns = [c for c in source.column_names if c in TEXT_FIELDS]
    # With such columns each example also keeps ``full_length``, its token count before the cut.
    keep_full_length = truncate and not grouping and len(text_columns) < len(source.column_names)
    processes = tokenization_workers(workers, len(source))
    encoded = source.map(
        encode,
        batched=True,
        batch_size=512,
        remove_columns=text_columns,
        keep_in_memory=True,
        load_from_cache_file=False,
        num_proc=processes if processes > 1 else None,
        # The cache key names the result; without it datasets would pickle the whole closure (the tokenizer,
        # the plugins' hooks) to fingerprint every map, several seconds on a large dataset.
        new_fingerprint=f"{key}-tokenized",
        desc="Tokenizing",
    )
    full_lengths = sorted(encoded["_full_length"])
    finished = encoded.map(
        finish,
        batched=True,
        batch_size=1000,
        keep_in_memory=True,
        load_from_cache_file=False,
        remove_columns=encoded.column_names if grouping else ["_full_length"],
        new_fingerprint=f"{key}-cut",
        desc="Cutting to block size",
    )
    trained = finished["_trained"]
    stats = DataStats(
        type=raw.type,
        records=len(raw),
        examples=0,
        block_size=block_size,
        converted=dict(raw.converted),
        truncated=0 if grouping or not truncate else sum(n > block_size for n in full_lengths),
        dropped_untrained=sum(n == 0 for n in trained),
        trained_tokens=sum(trained),
        max_token_id=max(finished["_max_id"], default=-1),
    )
    if full_lengths:
        stats.length_min, stats.length_max = full_lengths[0], full_lengths[-1]
        stats.length_mean = round(statistics.fmean(full_lengths), 2)
        stats.length_median = statistics.median(full_lengths)
        stats.length_p95 = full_lengths[min(len(full_lengths) - 1, int(0.95 * len(full_lengths)))]
    # With plugin columns the untrained examples stay until the plugins' prepare_dataset has seen them (a cut
    # image: an error naming the record); the pipeline drops them after it (drop_untrained).
    if stats.dropped_untrained and not keep_full_length:
        finished = finished.filter(
            lambda b: [n > 0 for n in b["_trained"]],
            batched=True,
            keep_in_memory=True,
            load_from_cache_file=False,
            new_fingerprint=f"{key}-kept",
        )
    kept = [n > 0 for n in finished["_trained"]]
    stats.tokens = sum(n for n, keep in zip(finished["_length"], kept) if keep)
    stats.examples = sum(kept)
    stats.workers = processes
    stats.seconds = round(time.monotonic() - started, 2)
    encoded = finished.remove_columns(["_trained", "_max_id", "_length"])
    if use_cache and _save_cache(cache_dir, encoded, stats):
        # The saved copy, memory-mapped, as a cached run gets it: the tokenizing passes' memory goes back.
        encoded = datasets.load_from_disk(str(cache_dir / "data"))
    release_memory()
    return encoded, stats


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
    """What the tokenized data depends on: the records themselves, the tokenizer, template and settings."""
    import json

    from datasets.fingerprint import Hasher

    digest = hashlib.sha256()
    for part in (CACHE_FORMAT, raw.type, str(block_size), str(group), extra, repr(template)):
        digest.update(part.encode() + b"\0")
    for record in raw.records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\0")
    digest.update(Hasher.hash(tokenizer).encode())
    return digest.hexdigest()[:32]


def _save_cache(cache_dir: Path, dataset: Any, stats: DataStats) -> bool:
    """Write the tokenized dataset to the cache atomically (a staging directory renamed into place); whether
    it is there now."""
    import json

    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_dir.parent))
    except OSError:
        return False  # a cache that cannot be written only costs time on the next run
    try:
        dataset.save_to_disk(str(staging / "data"))
        (staging / "stats.json").write_text(json.dumps(stats.to_dict()))
        if cache_dir.exists():
            shutil.rmtree(cache_dir, ignore_errors=True)
        os.replace(staging, cache_dir)
        return True
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        return False
