"""Negative log-likelihood of examples: the core's evaluation (``lmflow evaluate``, a run's eval data).

Two definitions of which tokens are scored (``NLL_DEFINITIONS``):

* ``training`` (the default): the examples as training tokenizes them (the tokenizer's BOS, if it adds one,
  as unscored context; an EOS scored after every text and answer; conversations as the template masks them).
  Long examples are read with overlapping windows so that every token is scored once.
* ``lmflow``: LMFlow's ``Evaluator._evaluate_nll`` (``src/lmflow/pipeline/evaluator.py``), for numbers
  comparable with LMFlow's: no special tokens at all (``add_special_tokens=False``, no EOS appended), so the
  first token of every example, which has nothing to be predicted from, is never scored; windows of LMFlow's
  ``max_length`` (:func:`lmflow_window`) started every ``evaluate_block_size`` tokens (default 512), where a
  window as long as the stride or shorter leaves its first token, and any tokens between windows, unscored.

Either way ``nll_per_sample`` is the summed NLL over all examples divided by the number of examples.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from .data.collate import PaddingCollator
from .errors import LmflowError
from .stash import StashKey

NLL_DEFINITIONS = {
    "training": "score the tokens training trains, the EOS after each text or answer included",
    "lmflow": "reproduce LMFlow's evaluator: no BOS or EOS, LMFlow's window and stride",
}
# Which definition ``nll_metrics`` applies (``config.stash[NLL_DEFINITION]``); a run's eval data: "training".
NLL_DEFINITION: StashKey[str] = StashKey()
LMFLOW_STRIDE = 512  # LMFlow's --evaluate_block_size default
LMFLOW_FALLBACK_WINDOW = 1024  # LMFlow's max_length where the model config has no n_positions


def check_nll_definition(name: str) -> str:
    """``name`` if it is one of ``NLL_DEFINITIONS``; else an error naming the choices."""
    if name in NLL_DEFINITIONS:
        return name
    close = difflib.get_close_matches(name, list(NLL_DEFINITIONS), n=1)
    guess = f" (did you mean '{close[0]}'?)" if close else ""
    raise LmflowError(f"unknown NLL definition '{name}'{guess}", f"use one of: {', '.join(NLL_DEFINITIONS)}")


def lmflow_window(model_config: Any, tokenizer: Any) -> int:
    """LMFlow's ``max_length`` for NLL: ``min(config.n_positions, tokenizer.model_max_length)``, and where
    the config has no ``n_positions`` (Llama and most models since GPT-2) ``min(1024, model_max_length)``,
    whatever the model's real context."""
    limit = getattr(tokenizer, "model_max_length", None) or LMFLOW_FALLBACK_WINDOW
    positions = getattr(model_config, "n_positions", None)
    if not isinstance(positions, int):
        positions = LMFLOW_FALLBACK_WINDOW
    return min(positions, limit)


def nll_metrics(config: Any, model: Any, tokenizer: Any, dataset: Any) -> dict[str, float]:
    """The metrics of the core's ``evaluate`` hook (see there) for a tokenized dataset."""
    from .models import model_context

    stash = getattr(config, "stash", None)
    lmflow = stash is not None and stash.get(NLL_DEFINITION, "training") == "lmflow"
    if lmflow:
        window = config.block_size or lmflow_window(model.config, tokenizer)
        stride = config.eval_stride or LMFLOW_STRIDE
    else:
        window = config.block_size or model_context(model.config) or 1024
        stride = config.eval_stride or max(1, window // 2)
    per_sample = sample_nll(
        model,
        tokenizer,
        dataset,
        batch_size=config.eval_batch_size or config.batch_size,
        window=window,
        stride=stride,
        allow_gaps=lmflow,
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
    model: Any,
    tokenizer: Any,
    dataset: Any,
    batch_size: int = 8,
    window: int = 1024,
    stride: int = 512,
    allow_gaps: bool = False,
) -> list[tuple[float, int]]:
    """``(summed NLL, scored tokens)`` of each example, in nats.

    Examples that fit the window are scored in padded batches, one forward pass each; longer ones window by
    window, a window starting every ``stride`` tokens. A token is scored where it is predicted (position ``p``
    from the logits at ``p - 1``), so an example's first token and a window's first token never are.

    ``allow_gaps`` accepts a stride as long as the window or longer (LMFlow's windowing): each window's first
    token, and the tokens between windows, then go unscored. Without it such a stride is an error.
    """
    import torch

    if stride >= window and not allow_gaps:
        raise LmflowError(f"the evaluation stride ({stride}) must be smaller than the window ({window})")
    collate = PaddingCollator(tokenizer)
    was_training = model.training
    model.eval()
    lengths = [len(ids) for ids in dataset["input_ids"]]
    # An example of one token or none has nothing to predict: it counts, with NLL 0 (LMFlow's loop gives NaN:
    # the mean loss over no token, times zero valid labels).
    results: dict[int, tuple[float, int]] = {i: (0.0, 0) for i, n in enumerate(lengths) if n < 2}
    short = [i for i, n in enumerate(lengths) if 2 <= n <= window]
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
    """Score a long example window by window; each window scores only the tokens no earlier one scored.

    Windows start every ``stride`` tokens and end at ``window`` tokens or the example's end, where the loop
    stops; with ``stride >= window`` nothing is masked and the tokens between windows are never read.
    """
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
