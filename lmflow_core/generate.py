"""Decoding, shared by run samples and the inference commands (generate, chat, serve).

Generation always goes through the ``decode`` hook (the core default calls ``model.generate``), and prompts for
conversations always go through the ``format_conversation`` hook with the generation prompt appended, so a model
is prompted exactly in the format it was trained on. Text is cut at the template's end-of-turn markers and at
the caller's stop strings, also while it streams: a stop string is never shown, not even in part.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .templates import Conversation, Template, encode_prompt, render_text


@dataclass
class GenerationOptions:
    """How to decode.

    Attributes:
        max_new_tokens: most tokens to generate.
        greedy: pick the most likely token each step; otherwise sample.
        temperature, top_k, top_p: sampling controls (ignored when greedy; top_k 0 and top_p 1 disable them).
        repetition_penalty: >1 discourages repeating tokens.
        stop_strings: stop when any of these appears (the template's end-of-turn markers are added).
        seed: seed for sampling, for reproducible outputs.
        stats: filled by the decoder with figures worth reporting (e.g. a draft model's acceptance rate).
    """

    max_new_tokens: int = 256
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = field(default=())
    seed: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)

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
            kwargs.update(temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p)
        else:
            # Neutral values so a model's generation_config (e.g. temperature=0.6) does not warn in greedy mode.
            kwargs.update(temperature=None, top_k=None, top_p=None)
        if tokenizer.eos_token_id is not None:
            kwargs["eos_token_id"] = tokenizer.eos_token_id
        if self.stop_strings:
            kwargs.update(stop_strings=list(self.stop_strings), tokenizer=tokenizer)
        return kwargs

    def logits_processors(self) -> Any:
        """The transformers ``LogitsProcessorList`` these options apply to next-token scores, as
        ``model.generate`` would (repetition penalty; temperature, top-k, top-p when sampling): for decoders that
        pick tokens themselves."""
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        processors: list[Any] = []
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if not self.greedy:
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        return LogitsProcessorList(processors)

    def with_stops(self, stops: tuple[str, ...]) -> GenerationOptions:
        """A copy with more stop strings (duplicates dropped, order kept)."""
        merged = tuple(dict.fromkeys((*self.stop_strings, *stops)))
        return GenerationOptions(**{**self.__dict__, "stop_strings": merged, "stats": self.stats})


@dataclass
class Generation:
    """The result of one generation."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-turn, EOS or a stop string) or "length" (max_new_tokens)
    prompt_tokens: int
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def visible_text(
    raw: str, stops: tuple[str, ...], specials: tuple[str, ...], final: bool
) -> tuple[str, bool]:
    """What of generated text a user sees: cut at the first stop string, special tokens removed, stripped.

    While streaming (``final=False``), a tail that may still grow into a stop string or a special token, an
    incomplete character, and trailing whitespace are held back, so the streamed pieces always add up to the
    final text. Returns the text and whether a stop string was found.
    """
    cut, stopped = len(raw), False
    for stop in stops:
        if stop and stop in raw:
            cut, stopped = min(cut, raw.index(stop)), True
    text = raw[:cut]
    if not final and not stopped:
        hold = 0
        for marker in (*stops, *specials):
            for size in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:size]):
                    hold = max(hold, size)
                    break
        text = text[: len(text) - hold] if hold else text
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            text = text.rstrip("\ufffd")
    for special in specials:
        if special:
            text = text.replace(special, "")
    # Leading whitespace is dropped; trailing whitespace is shown only once text follows it (or never).
    return text.strip(), stopped


class GenerationStopped(Exception):
    """Raised inside a decoder (through its streamer) when the caller asks generation to stop."""


class TextStream:
    """A transformers-style streamer that turns generated tokens into visible text pieces for ``on_text``.

    With ``should_stop``, it is also the point where any decoder can be stopped: after each token it asks, and
    raises :class:`GenerationStopped` when told to (the tokens so far stay in ``ids``).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_length: int,
        stops: tuple[str, ...],
        on_text: Callable[[str], None] | None,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.stops = stops
        self.specials = tuple(t for t in tokenizer.all_special_tokens if t)
        self.on_text = on_text
        self.should_stop = should_stop
        self.ids: list[int] = []
        self.shown = ""
        self.skip_prompt = True

    def put(self, value: Any) -> None:
        ids = value.reshape(-1).tolist() if hasattr(value, "reshape") else list(value)
        if self.skip_prompt:  # model.generate passes the prompt first
            self.skip_prompt = False
            if len(ids) == self.prompt_length:
                return
        self.ids.extend(ids)
        self._emit(final=False)
        if self.should_stop is not None and self.should_stop():
            raise GenerationStopped

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        if self.on_text is None:
            return
        raw = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        text, _ = visible_text(raw, self.stops, self.specials, final)
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.on_text(text[len(self.shown) :])
            self.shown = text


def generate_ids(
    hook: Any,
    model: Any,
    tokenizer: Any,
    input_ids: Any,
    options: GenerationOptions,
    streamer: Any = None,
    config: Any = None,
    inputs: dict[str, Any] | None = None,
) -> Any:
    """The new token ids after ``input_ids`` (shape ``(1, n)``), through the ``decode`` hook; ``inputs`` are
    the prompt's other model inputs (``prompt_inputs``: pixel values...)."""
    import torch

    if options.seed is not None:
        torch.manual_seed(options.seed)
    input_ids = input_ids.to(model.device)
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in (inputs or {}).items()}
    with torch.no_grad():
        output = hook.decode(
            config=config,
            model=model,
            tokenizer=tokenizer,
            input_ids=input_ids,
            options=options,
            streamer=streamer,
            inputs=inputs,
        )
    return output[0, input_ids.shape[1] :]


def generate_text(
    hook: Any,
    model: Any,
    tokenizer: Any,
    prompt: str,
    options: GenerationOptions,
    on_text: Callable[[str], None] | None = None,
    config: Any = None,
    add_special_tokens: bool = False,
    template: Template | None = None,
    inputs: dict[str, Any] | None = None,
) -> Generation:
    """Generate after a prompt text, cutting at the stop strings.

    A rendered chat prompt already holds its special tokens as text (``add_special_tokens=False``); a raw
    prompt gets what the tokenizer adds by itself (e.g. BOS) with ``add_special_tokens=True``. A chat prompt
    of ``template`` is tokenized as training tokenizes it (Llama 2: turn by turn, as Meta's code does).
    """
    if template is not None:
        ids = encode_prompt(tokenizer, prompt, template)
    else:
        ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    return generate_from_ids(hook, model, tokenizer, ids, options, on_text, config, inputs=inputs)


def generate_from_ids(
    hook: Any,
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    options: GenerationOptions,
    on_text: Callable[[str], None] | None = None,
    config: Any = None,
    should_stop: Callable[[], bool] | None = None,
    inputs: dict[str, Any] | None = None,
) -> Generation:
    """Generate after prompt token ids through the ``decode`` hook, cutting at the stop strings.

    ``should_stop`` is asked after every token (through the streamer every decoder feeds); when it answers
    true, generation ends there with the tokens so far and finish reason ``"length"``.
    """
    import torch

    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    prompt_length = input_ids.shape[1]
    stream = (
        TextStream(tokenizer, prompt_length, options.stop_strings, on_text, should_stop)
        if on_text or should_stop
        else None
    )
    try:
        new_ids = generate_ids(hook, model, tokenizer, input_ids, options, stream, config, inputs).tolist()
    except GenerationStopped:
        return finished_generation(tokenizer, stream.ids, options, prompt_length, stopped_early=True)
    return finished_generation(tokenizer, new_ids, options, prompt_length)


def finished_generation(
    tokenizer: Any,
    new_ids: list[int],
    options: GenerationOptions,
    prompt_length: int,
    stopped_early: bool = False,
) -> Generation:
    """The :class:`Generation` for the new token ids: the visible text and why it ended."""
    raw = tokenizer.decode(new_ids, skip_special_tokens=False)
    specials = tuple(t for t in tokenizer.all_special_tokens if t)
    text, stopped = visible_text(raw, options.stop_strings, specials, final=True)
    ended = stopped or (tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new_ids)
    if stopped_early:
        finish = "stop" if ended else "length"
    else:
        finish = "stop" if ended or len(new_ids) < options.max_new_tokens else "length"
    return Generation(text, new_ids, finish, prompt_length, dict(options.stats))


def chat_prompt(
    hook: Any, template: Template, conversation: Conversation, tokenizer: Any, config: Any = None
) -> str:
    """The prompt text for the assistant's next turn, rendered through the ``format_conversation`` hook."""
    segments = hook.format_conversation(
        config=config,
        template=template,
        conversation=conversation,
        add_generation_prompt=True,
        tokenizer=tokenizer,
    )
    return render_text(segments)


def reply(
    hook: Any,
    model: Any,
    tokenizer: Any,
    template: Template,
    conversation: Conversation,
    options: GenerationOptions,
    on_text: Callable[[str], None] | None = None,
    config: Any = None,
) -> Generation:
    """The assistant's next message, decoded and cut at the template's end-of-turn markers."""
    prompt = chat_prompt(hook, template, conversation, tokenizer, config)
    return generate_text(
        hook,
        model,
        tokenizer,
        prompt,
        reply_options(template, tokenizer, options),
        on_text,
        config,
        template=template,
        inputs=prompt_inputs(hook, model, tokenizer, conversation, config),
    )


def prompt_inputs(
    hook: Any, model: Any, tokenizer: Any, conversation: Conversation, config: Any = None
) -> dict[str, Any]:
    """The prompt's model inputs beside its token ids (``prompt_inputs`` hook; empty for a text prompt)."""
    return (
        hook.prompt_inputs(config=config, model=model, tokenizer=tokenizer, conversation=conversation) or {}
    )


def reply_options(template: Template, tokenizer: Any, options: GenerationOptions) -> GenerationOptions:
    """``options`` with the template's end-of-turn markers (else the tokenizer's EOS) added as stop strings."""
    stops = template.stop_strings or ((tokenizer.eos_token,) if tokenizer.eos_token else ())
    return options.with_stops(stops)


def reply_prompt_ids(
    hook: Any, template: Template, conversation: Conversation, tokenizer: Any, config: Any = None
) -> list[int]:
    """The token ids :func:`reply` prompts the model with for ``conversation``."""
    return encode_prompt(tokenizer, chat_prompt(hook, template, conversation, tokenizer, config), template)


def run_in_thread(function: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``function`` in a thread; the returned dict receives ``result`` or ``error``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = function()
        except BaseException as exc:  # handed to the caller, which re-raises it
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box
