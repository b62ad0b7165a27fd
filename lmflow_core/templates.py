"""Conversation templates: one definition for training (text, token ids, loss mask) and for inference.

A template renders a :class:`Conversation` into :class:`Segment` objects: pieces of text, each marked as
trained (carries the loss) or not. Training tokenizes the joined text once and marks a token as trained when it
overlaps a trained segment, so the token ids are exactly those of the rendered text: what the model is trained
on is what it is prompted with at inference time, where the same template renders the prompt with the
generation prompt appended.

Templates come from plugins through the ``register_templates`` hook (see ``lmflow templates list``) or from a
small YAML/JSON file holding the fields of :class:`TurnTemplate` (``--template path/to/template.yaml``).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LmflowError

ROLES = ("system", "user", "assistant")


class TemplateError(LmflowError):
    """A conversation does not fit the template (roles, order, system prompt)."""

    exit_code = 2


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    content: str


@dataclass
class Conversation:
    """A system prompt (optional) and the turns that follow it."""

    messages: list[Message]
    system: str | None = None

    @classmethod
    def from_messages(
        cls, messages: Sequence[dict[str, str] | Message], system: str | None = None
    ) -> Conversation:
        """Build from ``[{"role", "content"}, ...]``; a leading ``system`` message becomes the system prompt."""
        turns = [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in messages]
        if turns and turns[0].role == "system" and system is None:
            system, turns = turns[0].content, turns[1:]
        return cls(turns, system)


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; ``trained`` pieces carry the loss."""

    text: str
    trained: bool = False


class Template:
    """Base class of conversation templates. Subclasses implement :meth:`render`.

    Attributes:
        name: what ``--template`` selects.
        description: one line for ``lmflow templates list``.
        stop_strings: text that ends an assistant turn, for generation.
    """

    name: str = ""
    description: str = ""
    stop_strings: tuple[str, ...] = ()

    def check(self, conversation: Conversation) -> None:
        """Raise :class:`TemplateError` if the conversation cannot be rendered by this template."""
        if not conversation.messages:
            raise TemplateError("the conversation has no messages")
        for i, message in enumerate(conversation.messages):
            if message.role not in ("user", "assistant"):
                hint = " (a system prompt may only come first)" if message.role == "system" else ""
                raise TemplateError(
                    f"message {i} has role '{message.role}'; expected user or assistant{hint}"
                )
            expected = "user" if i % 2 == 0 else "assistant"
            if message.role != expected:
                raise TemplateError(
                    f"message {i} is from '{message.role}' but roles must alternate user/assistant, starting "
                    "with user"
                )

    def render(
        self, conversation: Conversation, add_generation_prompt: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        """Render the conversation; with ``add_generation_prompt`` end with the assistant's turn header."""
        raise NotImplementedError

    def special_tokens(self, tokenizer: Any) -> dict[str, str]:
        """Values of the ``{bos_token}`` / ``{eos_token}`` placeholders: the tokenizer's, or empty strings."""
        return {
            "{bos_token}": (getattr(tokenizer, "bos_token", None) or "") if tokenizer is not None else "",
            "{eos_token}": (getattr(tokenizer, "eos_token", None) or "") if tokenizer is not None else "",
        }


def _fill(pattern: str, content: str | None, specials: dict[str, str]) -> str:
    for key, value in specials.items():
        pattern = pattern.replace(key, value)
    return pattern.replace("{content}", content) if content is not None else pattern


@dataclass
class TurnTemplate(Template):
    """A template described by the text around each turn; covers most chat formats.

    Each pattern may contain ``{content}`` (the message text), ``{bos_token}`` and ``{eos_token}``.

    Attributes:
        prefix: text at the very start (e.g. ``"{bos_token}"``).
        system: the system turn; ``None`` when the family has no system prompt (a system prompt is then an
            error, unless ``system_in_first_user`` is set).
        user: the user turn.
        assistant_header: the text that opens an assistant turn (not trained; also the generation prompt).
        assistant_end: the end-of-turn marker right after the assistant's text (trained: the model must learn
            to stop).
        assistant_trailer: text after the end-of-turn marker (not trained, e.g. a newline).
        default_system: system prompt used when the conversation has none.
        strip_content: strip whitespace around message text, as many families' own templates do.
    """

    name: str = ""
    description: str = ""
    prefix: str = ""
    system: str | None = "{content}"
    user: str = "{content}"
    assistant_header: str = ""
    assistant_end: str = ""
    assistant_trailer: str = ""
    default_system: str | None = None
    strip_content: bool = False
    stop_strings: tuple[str, ...] = field(default=())

    def check(self, conversation: Conversation) -> None:
        super().check(conversation)
        if conversation.system is not None and self.system is None:
            raise TemplateError(
                f"template '{self.name}' has no system prompt but the conversation has one",
                "remove the system prompt or choose a template that supports one",
            )

    def render(
        self, conversation: Conversation, add_generation_prompt: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        self.check(conversation)
        specials = self.special_tokens(tokenizer)
        clean = (lambda s: s.strip()) if self.strip_content else (lambda s: s)
        segments = [Segment(_fill(self.prefix, None, specials))]
        system = conversation.system if conversation.system is not None else self.default_system
        if system is not None and self.system is not None:
            segments.append(Segment(_fill(self.system, clean(system), specials)))
        for message in conversation.messages:
            if message.role == "user":
                segments.append(Segment(_fill(self.user, clean(message.content), specials)))
            else:
                segments.append(Segment(_fill(self.assistant_header, None, specials)))
                trained = clean(message.content) + _fill(self.assistant_end, None, specials)
                segments.append(Segment(trained, trained=True))
                segments.append(Segment(_fill(self.assistant_trailer, None, specials)))
        if add_generation_prompt:
            segments.append(Segment(_fill(self.assistant_header, None, specials)))
        return [s for s in segments if s.text]

    @classmethod
    def from_file(cls, path: str | Path) -> TurnTemplate:
        """Load a template from a YAML or JSON file holding this class's fields."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise TemplateError(f"template file {path} cannot be read: {exc}", "fix the file") from exc
        if not isinstance(data, dict):
            raise TemplateError(f"template file {path} must be a mapping of field: value")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TemplateError(
                f"template file {path} has unknown fields {', '.join(unknown)}",
                f"use only {', '.join(sorted(names))}",
            )
        data.setdefault("name", str(path))
        if "stop_strings" in data:
            data["stop_strings"] = tuple(data["stop_strings"] or ())
        return cls(**data)


def available_templates() -> dict[str, Template]:
    """Every template that the installed plugins register, by name."""
    from .plugins import load_catalog

    pm, _broken = load_catalog()
    templates: dict[str, Template] = {}
    owners: dict[str, str] = {}
    for impl in pm.hook.register_templates.get_hookimpls():
        for template in impl.function() or []:
            if template.name in templates:
                raise LmflowError(
                    f"plugins '{owners[template.name]}' and '{impl.plugin_name}' both define the template "
                    f"'{template.name}'",
                    "uninstall one of them",
                )
            templates[template.name] = template
            owners[template.name] = impl.plugin_name
    return dict(sorted(templates.items()))


def get_template(name: str) -> Template:
    """A template by registered name, or from a ``.yaml``/``.yml``/``.json`` file path."""
    if name.endswith((".yaml", ".yml", ".json")) or "/" in name:
        if not Path(name).is_file():
            raise TemplateError(f"template file {name} does not exist", "check the path given to --template")
        return TurnTemplate.from_file(name)
    templates = available_templates()
    if name not in templates:
        import difflib

        close = difflib.get_close_matches(name, list(templates), n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        raise TemplateError(
            f"unknown template '{name}'{guess}; available: {', '.join(templates)}",
            "see `lmflow templates list`, or pass a template file",
        )
    return templates[name]


def render_text(segments: Sequence[Segment]) -> str:
    """The rendered text of some segments."""
    return "".join(s.text for s in segments)


def trained_spans(segments: Sequence[Segment]) -> list[tuple[int, int]]:
    """Character ranges ``[start, end)`` of the trained segments in the rendered text."""
    spans, pos = [], 0
    for segment in segments:
        end = pos + len(segment.text)
        if segment.trained and end > pos:
            if spans and spans[-1][1] == pos:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((pos, end))
        pos = end
    return spans


def labels_from_offsets(
    input_ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Labels for ``input_ids``: the id where the token overlaps a trained span, -100 elsewhere."""
    starts = [s for s, _ in spans]
    labels = []
    for token_id, (start, end) in zip(input_ids, offsets):
        i = bisect.bisect_right(starts, max(start, end - 1)) - 1
        overlaps = i >= 0 and end > start and start < spans[i][1] and end > spans[i][0]
        labels.append(token_id if overlaps else -100)
    return labels


def encode_segments(
    tokenizer: Any, batch: Sequence[Sequence[Segment]]
) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenize rendered conversations; returns ``(input_ids, labels)`` per conversation.

    The joined text is tokenized in one piece (so ids equal those of the rendered prompt at inference), and
    a token is trained when it overlaps a trained segment. Tokenizers without offset mappings (slow ones)
    are handled segment by segment.
    """
    texts = [render_text(segments) for segments in batch]
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        labels = [
            labels_from_offsets(sample_ids, offsets, trained_spans(segments))
            for sample_ids, offsets, segments in zip(ids, encoded["offset_mapping"], batch)
        ]
        return ids, labels
    all_ids, all_labels = [], []
    for segments in batch:
        sample_ids: list[int] = []
        sample_labels: list[int] = []
        for segment in segments:
            piece = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
            sample_ids.extend(piece)
            sample_labels.extend(piece if segment.trained else [-100] * len(piece))
        all_ids.append(sample_ids)
        all_labels.append(sample_labels)
    return all_ids, all_labels
