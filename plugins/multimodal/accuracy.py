"""Measuring a vision-language model on tokenized image conversations: NLL with the images, answer accuracy."""

from __future__ import annotations

import math
import re
from typing import Any

from .collate import ImageCollator
from .vision import Vision, open_image


def answers_match(reference: str, answer: str) -> bool:
    """The accuracy rule: the first word that is not an article matches, ignoring case and punctuation
    (``"a Circle, I think"`` answers ``"A circle."``)."""
    first = _first_word(answer)
    return first is not None and first == _first_word(reference)


def _first_word(text: str) -> str | None:
    words = [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in ("a", "an", "the")]
    return words[0] if words else None


def _split(example: dict[str, Any]) -> tuple[list[int], list[int]]:
    """The prompt (tokens before the first trained one) and the first answer's trained tokens."""
    ids, labels = example["input_ids"], example["labels"]
    start = next((i for i, label in enumerate(labels) if label != -100), len(labels))
    end = next((i for i in range(start, len(labels)) if labels[i] == -100), len(labels))
    return list(ids[:start]), list(ids[start:end])


def answer_accuracy(model: Any, tokenizer: Any, vision: Vision, dataset: Any) -> float:
    """Share of examples whose greedy answer (after the prompt and its images) matches the reference answer."""
    import torch

    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for example in dataset:
            prompt, reference = _split(example)
            if not prompt or not reference:
                continue
            inputs = vision.pixel_inputs([open_image(x) for x in example.get("images") or ()])
            ids = torch.tensor([prompt], device=model.device)
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            inputs.update(vision.token_type_ids(ids))
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=len(reference) + 2,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    **inputs,
                )
            answer = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
            correct += answers_match(tokenizer.decode(reference, skip_special_tokens=True), answer)
            total += 1
    finally:
        model.train(was_training)
    return round(correct / total, 4) if total else float("nan")


def image_nll(model: Any, vision: Vision, tokenizer: Any, dataset: Any, batch_size: int) -> dict[str, float]:
    """Negative log-likelihood of the trained tokens, the images in the input: per token, per example."""
    import torch

    collate = ImageCollator(vision, tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    total = tokens = 0.0
    examples = 0
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(model.device) for k, v in collate(rows).items()}
            labels = batch.pop("labels")
            with torch.no_grad():
                logits = model(**batch).logits.float()
            shifted = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), shifted, ignore_index=-100, reduction="sum"
            )
            total += float(losses)
            tokens += int((shifted != -100).sum())
            examples += len(rows)
    finally:
        model.train(was_training)
    per_token = total / tokens if tokens else float("nan")
    return {
        "nll_per_sample": round(total / examples, 4) if examples else float("nan"),
        "nll_per_token": round(per_token, 4),
        "perplexity": round(math.exp(per_token), 4) if tokens else float("nan"),
    }
