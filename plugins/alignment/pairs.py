"""Preference-pair batches, shared by the ``reward_model`` and ``dpo`` plugins.

The core tokenizes a preference dataset into pairs (the chosen answer in ``input_ids``/``labels``, the rejected
one in ``rejected_input_ids``/``rejected_labels``), and its collator turns B pairs into 2B rows: the chosen
answers, then the rejected ones. Labels are -100 everywhere but on the answers' tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lmflow_core import DataError

REJECTED_IDS = "rejected_input_ids"
IGNORE_INDEX = -100


def check_pairs(dataset: Any, plugin: str, split: str) -> None:
    """Refuse a dataset that is not preference pairs, naming the plugin that needs them."""
    if REJECTED_IDS not in dataset.column_names:
        raise DataError(
            f"--plugins {plugin} trains on preference pairs, but the {split} dataset holds single examples",
            'give records with "chosen" and "rejected" answers (see README, Preference data)',
        )


def halves(tensor: Any) -> tuple[Any, Any]:
    """The chosen and the rejected rows of a pair batch."""
    n = tensor.shape[0] // 2
    return tensor[:n], tensor[n:]


def answer_logps(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Per row: the summed log-probability of the trained (answer) tokens, and how many there are.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``. Computed as the gathered logit minus the log-sum-exp of its
    row, in float32, without materialising the log-softmax of the whole vocabulary.
    """
    import torch

    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    picked = torch.gather(logits, 2, safe.unsqueeze(-1)).squeeze(-1)
    logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return logps.sum(-1), mask.sum(-1)


def unwrap(model: Any) -> Any:
    """The model inside DDP/DeepSpeed wrappers (``.module``)."""
    while hasattr(model, "module") and not hasattr(model, "disable_adapter"):
        model = model.module
    return model


def pad_pairs(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """A batch of pairs as 2B right-padded rows (what the core's collator gives), for passes outside the trainer."""
    import torch

    rows = [(e["input_ids"], e["labels"]) for e in examples]
    rows += [(e[REJECTED_IDS], e["rejected_labels"]) for e in examples]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pair_batches(dataset: Any, batch_size: int, pad_id: int) -> Iterator[dict[str, Any]]:
    """The dataset's pairs in order, ``batch_size`` pairs at a time, padded as by :func:`pad_pairs`."""
    columns = ["input_ids", "labels", REJECTED_IDS, "rejected_labels"]
    for start in range(0, len(dataset), batch_size):
        chunk = dataset.select_columns(columns)[start : start + batch_size]
        examples = [dict(zip(columns, values)) for values in zip(*(chunk[c] for c in columns))]
        yield pad_pairs(examples, pad_id)


def pad_id_of(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
