"""Negative log-likelihood of examples: the core's evaluation (``lmflow evaluate``, a run's eval data)."""

from __future__ import annotations

import math
from typing import Any

from .data.collate import PaddingCollator
from .errors import LmflowError


def nll_metrics(config: Any, model: Any, tokenizer: Any, dataset: Any) -> dict[str, float]:
    """The metrics of the core's ``evaluate`` hook (see there) for a tokenized dataset."""
    from .models import model_context

    window = config.block_size or model_context(model.config) or 1024
    stride = config.eval_stride or max(1, window // 2)
    per_sample = sample_nll(
        model,
        tokenizer,
        dataset,
        batch_size=config.eval_batch_size or config.batch_size,
        window=window,
        stride=stride,
    )
    total = sum(nll for nll, _ in per_sample)
    tokens = sum(n for _, n in per_sample)
    per_token = total / tokens if tokens else float("nan")
    return {
        "nll_per_sample": total / len(per_sample) if per_sample else float("nan"),
        "nll_per_token": per_token,
        "perplexity": math.exp(per_token) if tokens else float("nan"),
        "eval_samples": float(len(per_sample)),
        "eval_tokens": float(tokens),
    }


def sample_nll(
    model: Any, tokenizer: Any, dataset: Any, batch_size: int = 8, window: int = 1024, stride: int = 512
) -> list[tuple[float, int]]:
    """``(summed NLL, scored tokens)`` of each example, in nats.

    Examples that fit the window are scored in padded batches, one forward pass each; longer ones window by
    window. A token is scored where it is predicted (position ``p`` from the logits at ``p - 1``).
    """
    import torch

    if stride >= window:
        raise LmflowError(f"the evaluation stride ({stride}) must be smaller than the window ({window})")
    collate = PaddingCollator(tokenizer)
    was_training = model.training
    model.eval()
    results: dict[int, tuple[float, int]] = {}
    lengths = [len(ids) for ids in dataset["input_ids"]]
    short = [i for i, n in enumerate(lengths) if n <= window]
    try:
        with torch.no_grad():
            for start in range(0, len(short), batch_size):
                indices = short[start : start + batch_size]
                batch = collate(list(dataset.select(indices)))
                sums, counts = _batch_nll(model, {k: v.to(model.device) for k, v in batch.items()})
                results.update((i, (float(s), int(c))) for i, s, c in zip(indices, sums, counts))
            for i in (i for i, n in enumerate(lengths) if n > window):
                example = dataset[i]
                results[i] = _windowed_nll(model, example["input_ids"], example["labels"], window, stride)
    finally:
        model.train(was_training)
    return [results[i] for i in range(len(lengths))]


def _batch_nll(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    mask = labels != -100
    return (losses * mask).sum(dim=1), mask.sum(dim=1)


def _windowed_nll(
    model: Any, ids: list[int], labels: list[int], window: int, stride: int
) -> tuple[float, int]:
    """Score a long example window by window; each window scores only the tokens no earlier one scored."""
    import torch

    total, count, scored_until = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        window_labels = list(labels[begin:end])
        for j in range(max(0, scored_until - begin)):
            window_labels[j] = -100  # scored by an earlier window, with more context
        batch = {
            "input_ids": torch.tensor([ids[begin:end]], device=model.device),
            "attention_mask": torch.ones(1, end - begin, dtype=torch.long, device=model.device),
            "labels": torch.tensor([window_labels], device=model.device),
        }
        sums, counts = _batch_nll(model, batch)
        total, count = total + float(sums[0]), count + int(counts[0])
        scored_until = end
        if end == len(ids):
            break
    return total, count
