"""Sequence packing: several tokenized examples share one row of at most ``block_size`` tokens.

Packing without cross-contamination rests on transformers' own mask logic:

* every row carries ``position_ids`` that restart at 0 for each example it holds. When a model is called with
  ``position_ids``, no 2-D ``attention_mask`` and no KV cache, transformers' ``create_causal_mask`` finds the
  examples from the positions (a new one starts wherever they do not grow by 1) and builds a block-diagonal
  causal mask for SDPA, eager and flex attention. FlashAttention-2 reads the same boundaries from the
  ``cu_seq_lens_*`` arguments the collator adds. Positions (RoPE or learned) restart per example too, so every
  example is computed exactly as if it were alone;
* the first label of every example is -100, so no token is trained to predict the start of the next example;
* the collator pads the rows of a batch to one length with a padding *segment* (its own positions from 0,
  labels -100), passes no ``attention_mask``, and ``use_cache=False``: with a cache transformers would skip
  the packed-sequence detection.

Rows are planned with best-fit decreasing (the longest example first, each into the fullest row that still has
room for it), one chunk of examples at a time through ``datasets.map``: deterministic, and the rows are nearly
full. The trainer shuffles the rows.
"""

from __future__ import annotations

import ast
import bisect
import inspect
import sys
import textwrap
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError
from .collate import PaddingCollator
from .prepare import IGNORE_INDEX

PACKED_COLUMNS = ("input_ids", "labels", "position_ids")
UNPACKED_COLUMNS = ("input_ids", "labels", "attention_mask")
# Layer kinds (transformers' ``layer_types``) whose only link between tokens is the attention mask. Recurrent,
# convolutional and indexer-based layers pass information along the row whatever the mask says.
MASKED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# transformers' functions that build attention masks; ``mask_function`` is the local name models give to one
# of them when they choose between full and sliding-window attention.
MASK_BUILDERS = frozenset(
    {
        "create_causal_mask",
        "create_sliding_window_causal_mask",
        "create_chunked_causal_mask",
        "create_masks_for_generate",
        "mask_function",
    }
)


@dataclass
class PackingStats:
    """What packing did: ``examples`` in ``rows`` of at most ``block_size`` tokens, ``fill`` = tokens / room."""

    examples: int
    rows: int
    tokens: int
    block_size: int

    @property
    def fill(self) -> float:
        """Share of the rows' room (``rows * block_size``) holding tokens rather than padding."""
        return self.tokens / (self.rows * self.block_size) if self.rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fill": round(self.fill, 4)}

    def summary(self) -> str:
        """``"1,200 examples -> 150 rows of up to 512 tokens, 96.1% filled"``."""
        return (
            f"{self.examples:,} examples -> {self.rows:,} rows of up to {self.block_size} tokens, "
            f"{self.fill:.1%} filled"
        )


def plan_rows(lengths: list[int], block_size: int) -> list[list[int]]:
    """Group example indices into rows of at most ``block_size`` tokens (best-fit decreasing).

    Examples are placed longest first (ties in index order), each into the row with the least room left that
    still fits it, or into a new row. An example longer than ``block_size`` gets a row of its own. The result
    depends only on the lengths, so a resumed run packs the same rows.
    """
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (room left, row number), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        slot = bisect.bisect_left(open_rows, (length, -1))
        if slot < len(open_rows):
            room, row = open_rows.pop(slot)
            rows[row].append(index)
        else:
            room, row = block_size, len(rows)
            rows.append([index])
        if room - length > 0:
            bisect.insort(open_rows, (room - length, row))
    return rows


def pack_examples(batch: dict[str, list], block_size: int) -> dict[str, list]:
    """Pack a batch of examples (``input_ids``, ``labels``) into rows with restarting ``position_ids``."""
    out: dict[str, list] = {name: [] for name in PACKED_COLUMNS}
    for members in plan_rows([len(ids) for ids in batch["input_ids"]], block_size):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            ids.extend(batch["input_ids"][i])
            # The label at an example's first token is never trained when it stands alone either: in a row it
            # would teach the previous example's last token to predict this one.
            labels.append(IGNORE_INDEX)
            labels.extend(batch["labels"][i][1:])
            positions.extend(range(len(batch["input_ids"][i])))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
    return out


def pack_dataset(dataset: Any, block_size: int, chunk_size: int = 1000) -> tuple[Any, PackingStats]:
    """Pack a tokenized ``datasets.Dataset`` into rows of at most ``block_size`` tokens.

    Examples are packed ``chunk_size`` at a time (batched ``datasets.map``), which bounds memory; only the
    last row of a chunk may be left part-empty by the chunking.

    Returns the packed dataset (``input_ids``, ``labels``, ``position_ids``) and its :class:`PackingStats`.

    Raises:
        ConfigError: the dataset has columns other than the tokenizer's (added by a plugin), which rows
            cannot carry.
    """
    # Columns named with a leading underscore are the tokenizer's bookkeeping; rows need none of them.
    extra = [c for c in dataset.column_names if c not in UNPACKED_COLUMNS and not c.startswith("_")]
    if extra:
        raise ConfigError(
            f"--packing cannot combine examples that carry extra columns ({', '.join(extra)})",
            "drop --packing, or the plugin that adds these columns",
        )
    from .store import scratch_dir

    # Counted and packed a chunk at a time, the rows written to a file: memory holds a chunk, not the dataset.
    tokens = sum(len(ids) for batch in dataset.iter(batch_size=10_000) for ids in batch["input_ids"])
    packed = dataset.map(
        pack_examples,
        fn_kwargs={"block_size": block_size},
        batched=True,
        batch_size=chunk_size,
        remove_columns=dataset.column_names,
        cache_file_name=str(scratch_dir() / "packed.arrow"),
        load_from_cache_file=False,
        desc="Packing",
    )
    return packed, PackingStats(examples=len(dataset), rows=len(packed), tokens=tokens, block_size=block_size)


class PackedCollator:
    """Batches packed rows: pads them to one length with a padding segment and passes no attention mask.

    The batch holds ``input_ids``, ``labels``, ``position_ids``, ``use_cache=False`` and, with
    ``flash_attention_kwargs``, the ``cu_seq_lens_q/k`` and ``max_length_q/k`` arguments through which
    FlashAttention-2 runs one variable-length attention over every example of the batch (attention
    implementations other than FlashAttention ignore them). Unpacked examples (evaluation data) are padded with
    an attention mask, as the default collator does.
    """

    def __init__(self, tokenizer: Any, flash_attention_kwargs: bool = True):
        self.pad_token_id = tokenizer.pad_token_id
        self.flash_attention_kwargs = flash_attention_kwargs
        self.unpacked = PaddingCollator(tokenizer)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if "position_ids" not in features[0]:
            return self.unpacked(features)
        longest = max(len(f["input_ids"]) for f in features)
        ids, labels, positions = [], [], []
        for f in features:
            pad = longest - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            positions.append(list(f["position_ids"]) + list(range(pad)))
        batch: dict[str, Any] = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "use_cache": False,
        }
        if self.flash_attention_kwargs:
            flat = batch["position_ids"].reshape(-1)
            starts = (flat == 0).nonzero().reshape(-1)
            cu_seq_lens = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
            longest_segment = int(cu_seq_lens.diff().max())
            batch.update(
                cu_seq_lens_q=cu_seq_lens,
                cu_seq_lens_k=cu_seq_lens,
                max_length_q=longest_segment,
                max_length_k=longest_segment,
            )
        return batch


# --------------------------------------------------------------------------------------------------------------
# Which architectures can train on packed rows
# --------------------------------------------------------------------------------------------------------------


def packing_problem(model_config: Any) -> str | None:
    """Why the model's architecture cannot train on packed rows, or ``None`` when it can.

    An architecture can when its base model passes ``position_ids`` to every transformers function that builds
    its attention mask (the packed-sequence detection needs them). This is read from the modeling code of the
    installed transformers, so it follows the library as architectures gain the feature.
    """
    from transformers import AutoModelForCausalLM

    model_type = getattr(model_config, "model_type", None) or type(model_config).__name__
    try:
        causal_lm = AutoModelForCausalLM._model_mapping[type(model_config)]
    except (KeyError, ValueError):
        return f"the architecture '{model_type}' is not one of transformers' causal language models"
    base = _base_model_class(causal_lm)
    if base is None or not _masks_follow_positions(base.forward):
        return (
            f"the architecture '{model_type}' ({causal_lm.__name__}) builds its attention mask without "
            "position ids, so packed examples would attend to each other"
        )
    layer_types = getattr(model_config.get_text_config(), "layer_types", None) or []
    other = sorted(set(layer_types) - MASKED_LAYER_TYPES)
    if other:
        return (
            f"the architecture '{model_type}' has {', '.join(other)} layers, which carry state from one "
            "token to the next regardless of the attention mask"
        )
    return None


def check_packing_support(model_config: Any) -> None:
    """Raise :class:`ConfigError` when ``--packing`` cannot work for this model (see :func:`packing_problem`)."""
    problem = packing_problem(model_config)
    if problem:
        raise ConfigError(f"--packing: {problem}", "drop --packing for this model")


def _base_model_class(causal_lm: type) -> type | None:
    """The class ``causal_lm.__init__`` assigns to its ``base_model_prefix`` attribute (e.g. ``LlamaModel``)."""
    prefix = getattr(causal_lm, "base_model_prefix", "") or "model"
    tree = _parse(causal_lm.__init__)
    if tree is None:
        return None
    module = sys.modules.get(causal_lm.__module__)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and any(
                isinstance(t, ast.Attribute) and t.attr == prefix and getattr(t.value, "id", None) == "self"
                for t in node.targets
            )
        ):
            found = getattr(module, node.value.func.id, None)
            return found if isinstance(found, type) else None
    return None


def _masks_follow_positions(forward: Any) -> bool:
    """True when ``forward`` builds masks with transformers' functions and passes them ``position_ids``."""
    tree = _parse(forward)
    if tree is None:
        return False
    dict_keys: dict[str, set[str]] = {}  # local dicts of keyword arguments: name -> keys
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
            if isinstance(value, ast.Dict):
                dict_keys[name] = {k.value for k in value.keys if isinstance(k, ast.Constant)}
            elif (
                isinstance(value, ast.Call)
                and isinstance(value.func, ast.Attribute)
                and value.func.attr == "copy"
                and isinstance(value.func.value, ast.Name)
            ):
                dict_keys[name] = set(dict_keys.get(value.func.value.id, set()))
    builds = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if name not in MASK_BUILDERS:
            continue
        given = {k.arg for k in node.keywords if k.arg}
        for k in node.keywords:
            if k.arg is None and isinstance(k.value, ast.Name):
                given |= dict_keys.get(k.value.id, set())
        builds.append("position_ids" in given)
    return bool(builds) and all(builds)


def _parse(function: Any) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None


__all__ = [
    "PackedCollator",
    "PackingStats",
    "check_packing_support",
    "pack_dataset",
    "pack_examples",
    "packing_problem",
    "plan_rows",
]
