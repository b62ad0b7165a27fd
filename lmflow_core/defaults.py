"""The core's own hook implementations, registered in every run as the plugin ``core``.

They are ``trylast``: a selected plugin that returns a value for a first-result hook replaces the default.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import LmflowError
from .plugins import hookimpl
from .templates import Segment


def model_source(config: Any) -> str:
    """The model id or directory a run loads from (the bundled demo when none is given)."""
    if config.model is not None:
        return config.model
    from .demo import demo_model_dir

    return str(demo_model_dir())


@hookimpl(trylast=True)
def load_tokenizer(config: Any) -> Any:
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
    if config.random_init or config.is_demo:
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


MODEL_COLUMNS = ("input_ids", "labels", "attention_mask")


class PaddingCollator:
    """Pads ``input_ids`` with the pad token and ``labels`` with -100; other columns are left to plugins."""

    def __init__(self, tokenizer: Any):
        from transformers import DataCollatorForSeq2Seq

        self.pad = DataCollatorForSeq2Seq(
            tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt"
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.pad([{k: f[k] for k in MODEL_COLUMNS if k in f} for f in features])


@hookimpl(trylast=True)
def data_collator(config: Any, tokenizer: Any) -> Any:
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
    """Negative log-likelihood of the trained tokens (labels != -100) of every example."""
    per_sample = sample_nll(model, tokenizer, dataset, batch_size=config.eval_batch_size or config.batch_size)
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


def sample_nll(model: Any, tokenizer: Any, dataset: Any, batch_size: int = 8) -> list[tuple[float, int]]:
    """``(summed NLL, scored tokens)`` of each example, in nats, from one forward pass per batch."""
    import torch

    collate = PaddingCollator(tokenizer)
    was_training = model.training
    model.eval()
    results: list[tuple[float, int]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
                batch = collate(list(rows))
                batch = {k: v.to(model.device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
                losses = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), labels.clamp(min=0), reduction="none"
                )
                mask = labels != -100
                sums = (losses * mask).sum(dim=1)
                counts = mask.sum(dim=1)
                results.extend((float(s), int(c)) for s, c in zip(sums, counts))
    finally:
        model.train(was_training)
    return results
