"""Tokenization with loss masks, truncation to the block size, and the on-disk cache.

Every example gets ``input_ids``, ``labels`` (-100 where no loss is taken) and ``attention_mask``:

* ``text_only``: all tokens are trained; texts end with EOS. With ``group_texts`` they are concatenated and cut
  into block-size chunks (the last chunk is kept, shorter), so nothing is truncated.
* ``text2text``: the input is not trained, the output and the EOS after it are.
* ``conversation``: the template decides (assistant turns and their end-of-turn marker are trained).

Examples longer than the block size are truncated and counted; examples left with no trained token are
dropped and counted. Both counts are reported, never silent. Tokenization runs batched through ``datasets``
and is cached under ``$LMFLOW_CACHE`` (default ``~/.cache/lmflow``), keyed by the data files, tokenizer,
template and settings.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..templates import Conversation, Segment, Template, encode_segments
from .formats import RawDataset

CACHE_FORMAT = "lmflow-data-v1"  # bump when tokenization changes, so old caches are not reused
IGNORE_INDEX = -100


@dataclass
class DataStats:
    """What tokenization did to a dataset; printed by ``lmflow data check`` and at the start of a run."""

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
    converted: dict[str, int] = field(default_factory=dict)
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_root() -> Path:
    """Where tokenized datasets are cached (``$LMFLOW_CACHE/datasets``)."""
    base = os.environ.get("LMFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmflow")
    return Path(base) / "datasets"


Formatter = Callable[[Template, Conversation], list[Segment]]


def tokenize_dataset(
    raw: RawDataset,
    tokenizer: Any,
    block_size: int,
    template: Template | None = None,
    format_conversation: Formatter | None = None,
    group_texts: bool = True,
    cache_extra: str = "",
    use_cache: bool = True,
) -> tuple[Any, DataStats]:
    """Tokenize ``raw`` into a ``datasets.Dataset`` of ``input_ids``, ``labels``, ``attention_mask``.

    Args:
        format_conversation: renders a conversation with the template (the ``format_conversation`` hook);
            defaults to ``template.render``.
        cache_extra: anything else the result depends on (e.g. plugins that format conversations).

    Returns the dataset and its :class:`DataStats`.
    """
    import datasets

    if raw.type == "conversation" and template is None:
        raise ValueError("conversation data needs a template")
    render = format_conversation or (lambda t, c: t.render(c, False, tokenizer))
    key = _cache_key(raw, tokenizer, block_size, template, group_texts, cache_extra)
    cache_dir = cache_root() / key
    if use_cache and (cache_dir / "stats.json").is_file():
        import json

        stats = DataStats(**json.loads((cache_dir / "stats.json").read_text()))
        stats.cached = True
        return datasets.load_from_disk(str(cache_dir / "data")), stats

    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list]) -> dict[str, list]:
        if raw.type == "conversation":
            rendered = [
                render(template, Conversation.from_messages(messages, system))
                for messages, system in zip(batch["messages"], batch["system"])
            ]
            ids, labels = encode_segments(tokenizer, rendered)
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
            labels = [list(x) for x in ids]
        return {"input_ids": ids, "labels": labels}

    source = datasets.Dataset.from_list(raw.records)
    encoded = source.map(
        encode,
        batched=True,
        batch_size=512,
        remove_columns=source.column_names,
        keep_in_memory=True,
        load_from_cache_file=False,
        desc="Tokenizing",
    )
    lengths = [len(x) for x in encoded["input_ids"]]
    stats = DataStats(
        type=raw.type, records=len(raw), examples=0, block_size=block_size, converted=dict(raw.converted)
    )
    if lengths:
        ordered = sorted(lengths)
        stats.length_min, stats.length_max = ordered[0], ordered[-1]
        stats.length_mean = round(statistics.fmean(ordered), 2)
        stats.length_median = statistics.median(ordered)
        stats.length_p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]

    if raw.type == "text_only" and group_texts:
        encoded = encoded.map(
            lambda b: _group(b, block_size),
            batched=True,
            batch_size=1000,
            keep_in_memory=True,
            load_from_cache_file=False,
            desc="Grouping texts",
        )
    else:
        stats.truncated = sum(n > block_size for n in lengths)
        encoded = encoded.map(
            lambda b: {k: [x[:block_size] for x in v] for k, v in b.items()},
            batched=True,
            keep_in_memory=True,
            load_from_cache_file=False,
            desc="Truncating",
        )
    trained = [sum(t != IGNORE_INDEX for t in x) for x in encoded["labels"]]
    keep = [i for i, n in enumerate(trained) if n > 0]
    stats.dropped_untrained = len(trained) - len(keep)
    if stats.dropped_untrained:
        encoded = encoded.select(keep, keep_in_memory=True)
    encoded = encoded.map(
        lambda b: {"attention_mask": [[1] * len(x) for x in b["input_ids"]]},
        batched=True,
        keep_in_memory=True,
        load_from_cache_file=False,
    )
    stats.examples = len(encoded)
    stats.tokens = sum(len(x) for x in encoded["input_ids"])
    stats.trained_tokens = sum(trained)
    if use_cache:
        _save_cache(cache_dir, encoded, stats)
    return encoded, stats


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
    from datasets.fingerprint import Hasher

    digest = hashlib.sha256()
    for part in (CACHE_FORMAT, raw.type, str(len(raw)), str(block_size), str(group), extra, repr(template)):
        digest.update(part.encode() + b"\0")
    for file in raw.files:
        stat = file.stat()
        digest.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode() + b"\0")
    digest.update(Hasher.hash(tokenizer).encode())
    return digest.hexdigest()[:32]


def _save_cache(cache_dir: Path, dataset: Any, stats: DataStats) -> None:
    """Write the tokenized dataset to the cache atomically (a staging directory renamed into place)."""
    import json

    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_dir.parent))
    except OSError:
        return  # a cache that cannot be written only costs time on the next run
    try:
        dataset.save_to_disk(str(staging / "data"))
        (staging / "stats.json").write_text(json.dumps(stats.to_dict()))
        if cache_dir.exists():
            shutil.rmtree(cache_dir, ignore_errors=True)
        os.replace(staging, cache_dir)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
