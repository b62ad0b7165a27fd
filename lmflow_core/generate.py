"""Decoding, shared by run samples and the inference commands.

Generation always goes through the ``decode`` hook (the core default calls ``model.generate``), and prompts for
conversations always go through the ``format_conversation`` hook with the generation prompt appended, so a model
is prompted exactly in the format it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .templates import Conversation, Template, render_text


@dataclass
class GenerationOptions:
    """How to decode.

    Attributes:
        max_new_tokens: most tokens to generate.
        greedy: pick the most likely token each step; otherwise sample.
        temperature, top_k, top_p: sampling controls (ignored when greedy).
        repetition_penalty: >1 discourages repeating tokens.
        stop_strings: stop when any of these appears (the template's end-of-turn markers are added).
        seed: seed for sampling, for reproducible outputs.
    """

    max_new_tokens: int = 128
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = field(default=())
    seed: int | None = None

    def generate_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": not self.greedy,
            "repetition_penalty": self.repetition_penalty,
            "pad_token_id": tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        }
        if not self.greedy:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        else:
            # Neutral values so a model's generation_config (e.g. temperature=0.6) does not warn in greedy mode.
            kwargs.update(temperature=None, top_k=None, top_p=None)
        if tokenizer.eos_token_id is not None:
            kwargs["eos_token_id"] = tokenizer.eos_token_id
        if self.stop_strings:
            kwargs.update(stop_strings=list(self.stop_strings), tokenizer=tokenizer)
        return kwargs


def generate_ids(
    hook: Any, model: Any, tokenizer: Any, input_ids: Any, options: GenerationOptions, streamer: Any = None
) -> Any:
    """The new token ids after ``input_ids`` (shape ``(1, n)``), through the ``decode`` hook."""
    import torch

    if options.seed is not None:
        torch.manual_seed(options.seed)
    input_ids = input_ids.to(model.device)
    with torch.no_grad():
        output = hook.decode(
            model=model, tokenizer=tokenizer, input_ids=input_ids, options=options, streamer=streamer
        )
    return output[0, input_ids.shape[1] :]


def chat_prompt(hook: Any, template: Template, conversation: Conversation, tokenizer: Any) -> str:
    """The prompt text for the assistant's next turn, rendered through the ``format_conversation`` hook."""
    segments = hook.format_conversation(
        template=template, conversation=conversation, add_generation_prompt=True, tokenizer=tokenizer
    )
    return render_text(segments)


def reply(
    hook: Any,
    model: Any,
    tokenizer: Any,
    template: Template,
    conversation: Conversation,
    options: GenerationOptions,
    streamer: Any = None,
) -> str:
    """The assistant's next message, decoded and cut at the template's end-of-turn marker."""
    prompt = chat_prompt(hook, template, conversation, tokenizer)
    input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stops = tuple(dict.fromkeys((*options.stop_strings, *template.stop_strings)))
    options = GenerationOptions(**{**options.__dict__, "stop_strings": stops})
    new_ids = generate_ids(hook, model, tokenizer, input_ids, options, streamer)
    text = tokenizer.decode(new_ids, skip_special_tokens=False)
    return clean_reply(text, stops, tokenizer)


def clean_reply(text: str, stops: tuple[str, ...], tokenizer: Any) -> str:
    """Cut generated text at the first stop string or EOS, and drop leftover special tokens."""
    cut = len(text)
    for stop in (*stops, tokenizer.eos_token or None):
        if stop and stop in text:
            cut = min(cut, text.index(stop))
    text = text[:cut]
    for special in tokenizer.all_special_tokens:
        text = text.replace(special, "")
    return text.strip()
