"""The core's own hook implementations, registered in every run as the plugin ``core``.

They are ``trylast``: a selected plugin that returns a value for a first-result hook replaces the default.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .data.collate import PaddingCollator
from .errors import LmflowError
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .templates import Segment


def model_source(config: Any) -> str:
    """The model id or directory a run loads from (the bundled demo's saved initial weights when none is
    given)."""
    if config.model is not None:
        return config.model
    from .demo import demo_base_dir

    return str(demo_base_dir(config.seed))


@hookimpl(trylast=True)
def load_tokenizer(config: Any) -> Any:
    return load_default_tokenizer(config)


def load_default_tokenizer(config: Any) -> Any:
    """The run's tokenizer as the core loads it (``--tokenizer``, else the model's own), with a pad token.

    Not itself a hook implementation, so a plugin that wraps the default can import it at module level.
    """
    from transformers import AutoTokenizer

    source = config.tokenizer or model_source(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LmflowError(
            f"cannot load a tokenizer from '{source}': {str(exc).splitlines()[0]}",
            "check --tokenizer/--model (a local directory with tokenizer files, or a hub id)",
        ) from exc
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token its EOS as pad token (padding is masked out of the loss)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LmflowError(
                "the tokenizer has neither a pad nor an EOS token",
                "add one to the tokenizer's special tokens",
            )
        tokenizer.pad_token = tokenizer.eos_token


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` stays ``"auto"``."""
    import torch

    return name if name == "auto" else getattr(torch, name)


@hookimpl(trylast=True)
def load_model(config: Any, model_config: Any, init_kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM, set_seed

    kwargs = {"dtype": torch_dtype(config.model_dtype), **init_kwargs}
    if config.random_init:
        set_seed(config.seed)
        if kwargs["dtype"] == "auto":
            kwargs["dtype"] = None
        return AutoModelForCausalLM.from_config(
            model_config,
            trust_remote_code=config.trust_remote_code,
            **{k: v for k, v in kwargs.items() if v is not None},
        )
    return AutoModelForCausalLM.from_pretrained(
        model_source(config), config=model_config, trust_remote_code=config.trust_remote_code, **kwargs
    )


@hookimpl(trylast=True)
def format_conversation(
    template: Any, conversation: Any, add_generation_prompt: bool, tokenizer: Any
) -> list[Segment]:
    return template.render(conversation, add_generation_prompt, tokenizer)


@hookimpl(trylast=True)
def data_collator(config: Any, tokenizer: Any) -> Any:
    if getattr(config, "packing", False):
        from .data.packing import PackedCollator

        return PackedCollator(tokenizer)
    return PaddingCollator(tokenizer)


@hookimpl(trylast=True)
def decode(model: Any, tokenizer: Any, input_ids: Any, options: Any, streamer: Any) -> Any:
    import torch

    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        streamer=streamer,
        **options.generate_kwargs(tokenizer),
    )


@hookimpl(trylast=True)
def evaluate(config: Any, model: Any, tokenizer: Any, dataset: Any) -> dict[str, float]:
    """Negative log-likelihood of the scored tokens (labels != -100) of every example, in nats.

    ``nll_per_sample`` is LMFlow's benchmark figure: each example's summed NLL, averaged over examples.
    Examples longer than the window (``config.block_size``, else the model's context) are read with a
    sliding window that moves by ``config.eval_stride`` tokens (default: half a window), so that every token is
    scored once, with at least ``window - stride`` tokens of context.
    """
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
