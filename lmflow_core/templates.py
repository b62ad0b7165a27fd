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

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LmflowError

ROLES = ("system", "user", "assistant", "tool")
#: Where an image stands in a message's text (the LLaVA convention). A message's ``images`` are its markers'
#: images, in order; a multimodal plugin renders each as its model's image tokens.
IMAGE_MARKER = "<image>"
#: OpenAI content parts that carry an image (``{"type": "image", "path"|"url"|"image": ...}``, ``image_url``).
IMAGE_PARTS = ("image", "image_url", "input_image")


class TemplateError(LmflowError):
    """A conversation does not fit the template (roles, order, system prompt, tools)."""

    exit_code = 2


@dataclass(frozen=True)
class ToolCall:
    """A function call made by the assistant: a name and JSON-serialisable arguments."""

    name: str
    arguments: Any


@dataclass(frozen=True)
class Message:
    """One turn of a conversation. Assistant turns may call tools; ``tool`` turns carry a tool's result.

    ``images`` are the images of the message, one per :data:`IMAGE_MARKER` in ``content``, in order: a path, a
    ``data:`` URL or a ``PIL.Image`` (what a multimodal plugin reads; text-only models refuse them).
    """

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    images: tuple[Any, ...] = ()


@dataclass
class Conversation:
    """A system prompt (optional), the turns that follow it, and the tools the assistant may call."""

    messages: list[Message]
    system: str | None = None
    tools: list[dict[str, Any]] | None = None

    @classmethod
    def from_messages(
        cls,
        messages: Sequence[dict[str, Any] | Message],
        system: str | None = None,
        tools: Any = None,
    ) -> Conversation:
        """Build from ``[{"role", "content", "tool_calls"?}, ...]`` (OpenAI style).

        A leading ``system`` message becomes the system prompt. ``tool_calls`` and ``tools`` may be given as
        lists or as JSON strings (how datasets store them).
        """
        turns = [m if isinstance(m, Message) else _message(m) for m in messages]
        if turns and turns[0].role == "system" and system is None:
            if turns[0].images:
                raise TemplateError("the system message holds an image", "put images in user messages")
            system, turns = turns[0].content, turns[1:]
        if isinstance(tools, str):
            tools = json.loads(tools)
        return cls(turns, system, list(tools) if tools else None)

    @classmethod
    def from_file(cls, path: str | Path) -> Conversation:
        """Read a ``--messages`` file: a JSON list of ``{"role", "content"}``, or an object with ``messages``
        and optional ``system`` and ``tools``."""
        from .inputs import read_input_text

        text = read_input_text(path, "--messages file", "pass a JSON list of {role, content}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise LmflowError(
                f"cannot read messages from {path}: {exc}", "pass a JSON list of {role, content}"
            ) from exc
        system = tools = None
        if isinstance(data, dict):
            data, system, tools = data.get("messages"), data.get("system"), data.get("tools")
        if not isinstance(data, list) or not all(isinstance(m, dict) and "role" in m for m in data):
            raise LmflowError(f'{path} must hold a JSON list of {{"role", "content"}} objects')
        return cls.from_messages(data, system, tools)

    @property
    def images(self) -> list[Any]:
        """Every image of the conversation, in the order of the messages."""
        return [image for m in self.messages for image in m.images]

    def to_dicts(self) -> list[dict[str, Any]]:
        """OpenAI-style message dicts, the system prompt first (what Jinja chat templates take)."""
        out: list[dict[str, Any]] = (
            [{"role": "system", "content": self.system}] if self.system is not None else []
        )
        for m in self.messages:
            item: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:
                item["tool_calls"] = [
                    {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in m.tool_calls
                ]
            out.append(item)
        return out


def _message(item: dict[str, Any]) -> Message:
    calls = item.get("tool_calls") or ()
    if isinstance(calls, str):
        calls = json.loads(calls)
    parsed = []
    for call in calls:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass  # arguments that are not JSON are kept as text
        parsed.append(ToolCall(function["name"], arguments))
    content, images = item.get("content") or "", list(item.get("images") or ())
    if isinstance(content, list):
        content, images = content_with_images(content, images)
    if images and content.count(IMAGE_MARKER) != len(images):
        raise TemplateError(
            f"a {item['role']} message has {content.count(IMAGE_MARKER)} {IMAGE_MARKER} marker(s) and "
            f"{len(images)} image(s)",
            f"put one {IMAGE_MARKER} where each image goes",
        )
    return Message(item["role"], content, tuple(parsed), tuple(images))


def content_with_images(parts: Sequence[Any], images: Sequence[Any] = ()) -> tuple[str, list[Any]]:
    """OpenAI content parts as text with an :data:`IMAGE_MARKER` per image part, and the images in order.

    Text parts are joined as the models' own chat templates join them (no separator). An image part gives
    its ``path``, ``url``, ``image`` or ``image_url`` (``{"url": ...}`` or a string) as the image.
    """
    texts, found = [], list(images)
    for n, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in IMAGE_PARTS:
            source = next((part[k] for k in ("path", "url", "image", "image_url") if part.get(k)), None)
            if isinstance(source, dict):
                source = source.get("url")
            if source is None:
                raise TemplateError(f'content part {n} is an image without "path", "url" or "image_url"')
            texts.append(IMAGE_MARKER)
            found.append(source)
        else:
            raise TemplateError(
                f"content part {n} is {kind!r}; parts are text or images",
                'send {"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}',
            )
    return "".join(texts), found


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; ``trained`` pieces carry the loss."""

    text: str
    trained: bool = False


def tojson(value: Any) -> str:
    """JSON as chat templates write it (``tojson`` in transformers: no key sorting, no ASCII escaping)."""
    return json.dumps(value, ensure_ascii=False)


class Template:
    """Base class of conversation templates. Subclasses implement :meth:`render`.

    Attributes:
        name: what ``--template`` selects.
        description: one line for ``lmflow templates list``.
        stop_strings: text that ends an assistant turn, for generation.
        supports_tools: whether ``tool`` messages, assistant tool calls and tool definitions are rendered.
        system_note: what happens to a system prompt, for ``lmflow templates show``.
        tokenize_per_bos: tokenize each piece of the rendered text that follows a BOS on its own (see
            :func:`encode_segments`); otherwise the text is tokenized in one piece.
    """

    name: str = ""
    description: str = ""
    stop_strings: tuple[str, ...] = ()
    supports_tools: bool = False
    system_note: str = ""
    tokenize_per_bos: bool = False

    def check(self, conversation: Conversation) -> None:
        """Raise :class:`TemplateError` if the conversation cannot be rendered by this template."""
        if not conversation.messages:
            raise TemplateError(
                "the conversation has no messages", "add at least a user and an assistant message"
            )
        uses_tools = conversation.tools or any(
            m.role == "tool" or m.tool_calls for m in conversation.messages
        )
        if uses_tools and not self.supports_tools:
            raise TemplateError(
                f"template '{self.name}' has no format for tool calls or tool messages",
                "use a template that supports tools (qwen2_5, qwen3, granite, or `tokenizer`)",
            )
        previous = None
        for i, message in enumerate(conversation.messages):
            if message.role not in ("user", "assistant", "tool"):
                hint = "; a system prompt may only come first" if message.role == "system" else ""
                raise TemplateError(
                    f"message {i} has role '{message.role}'; expected user, assistant or tool{hint}"
                )
            allowed = {
                None: ("user",),
                "user": ("assistant",),
                "assistant": ("user", "tool") if conversation.messages[i - 1].tool_calls else ("user",),
                "tool": ("tool", "assistant"),
            }[previous]
            if message.role not in allowed:
                raise TemplateError(
                    f"message {i} is from '{message.role}' but roles must alternate user/assistant, starting "
                    "with user (tool results may only follow an assistant's tool call)"
                )
            if message.tool_calls and message.role != "assistant":
                raise TemplateError(f"message {i} has tool calls but only assistant messages can make them")
            previous = message.role

    def render(
        self, conversation: Conversation, add_generation_prompt: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        """Render the conversation; with ``add_generation_prompt`` end with the assistant's turn header."""
        raise NotImplementedError

    def to_jinja(self, image: str = IMAGE_MARKER) -> str | None:
        """An equivalent Jinja chat template (saved with trained models), or ``None`` if there is none."""
        return None

    def special_tokens(self, tokenizer: Any) -> dict[str, str]:
        """Values of the ``{bos_token}`` / ``{eos_token}`` placeholders: the tokenizer's, or empty strings."""
        return {
            "{bos_token}": (getattr(tokenizer, "bos_token", None) or "") if tokenizer is not None else "",
            "{eos_token}": (getattr(tokenizer, "eos_token", None) or "") if tokenizer is not None else "",
        }


def _fill(pattern: str, content: str | None, specials: dict[str, str]) -> str:
    # Placeholders are replaced one by one (not str.format): message text may contain braces.
    for key, value in specials.items():
        pattern = pattern.replace(key, value)
    return pattern.replace("{content}", content) if content is not None else pattern


@dataclass
class TurnTemplate(Template):
    """A template described by the text around each turn; covers most chat formats.

    Each pattern may contain ``{content}`` (the message text), ``{bos_token}`` and ``{eos_token}`` (the
    tokenizer's; a template of a model family writes the family's own strings instead, e.g. ``"<bos>"``, so
    that it renders the same text with or without a tokenizer).

    Attributes:
        prefix: text at the very start, usually the family's BOS (e.g. ``"<s>"``).
        system: the system turn; ``None`` when the family has no system turn.
        system_in_first_user: when the family has no system turn, a pattern for the system prompt placed in
            front of the first user message (e.g. Llama 2's ``<<SYS>>`` block); with neither, a system prompt
            is an error.
        system_in_last_user: put the ``system_in_first_user`` text in front of the last message instead, when
            that is a user message, and nowhere otherwise (Mistral v2/v3 do this).
        system_outside_strip: the text from ``system_in_first_user`` is not stripped with the user's text.
        skip_empty_system: no system turn for an empty system prompt (Phi-3.5 tests its truth).
        user: the user turn.
        assistant_header: opens an assistant turn; not trained; also the generation prompt.
        assistant: the trained part of an assistant turn: the text and the end-of-turn marker the model must
            learn to stop with (e.g. ``"{content}<|im_end|>"``).
        assistant_trailer: text after the trained part (not trained, e.g. a newline).
        default_system: system prompt used when the conversation has none; ``{today}`` in it becomes the
            date (``YYYY-MM-DD``), as ``strftime_now`` does in the family's own template.
        strip_content: strip whitespace around message text, as many families' own templates do.
        strip_system: strip whitespace around the system prompt (default: as ``strip_content``).
        strip_user: strip whitespace around user messages (default: as ``strip_content``).
        strip_assistant: strip whitespace around assistant messages (default: as ``strip_content``).
        drop_reasoning: keep only the text after the last ``</think>`` of an assistant message.
        content_replacements: ``[old, new]`` pairs applied to message text before stripping.
        tokenize_per_bos: for training, tokenize each piece of the text that starts with the BOS on its own
            (so each piece gets the tokenizer's leading-space marker, as Meta's Llama 2 code encodes turns).
    """

    name: str = ""
    description: str = ""
    prefix: str = ""
    system: str | None = "{content}"
    system_in_first_user: str | None = None
    system_in_last_user: bool = False
    system_outside_strip: bool = False
    skip_empty_system: bool = False
    user: str = "{content}"
    assistant_header: str = ""
    assistant: str = "{content}"
    assistant_trailer: str = ""
    default_system: str | None = None
    strip_content: bool = False
    strip_system: bool | None = None
    strip_user: bool | None = None
    strip_assistant: bool | None = None
    drop_reasoning: bool = False
    content_replacements: tuple[tuple[str, str], ...] = ()
    tokenize_per_bos: bool = False
    stop_strings: tuple[str, ...] = field(default=())
    system_note: str = ""

    def check(self, conversation: Conversation) -> None:
        super().check(conversation)
        if conversation.system is not None and self.system is None and self.system_in_first_user is None:
            raise TemplateError(
                f"template '{self.name}' has no system prompt but the conversation has one",
                "remove the system prompt or choose a template that supports one",
            )

    def _strips(self, role: str) -> bool:
        own = {"user": self.strip_user, "assistant": self.strip_assistant, "system": self.strip_system}[role]
        return self.strip_content if own is None else own

    def _clean(self, text: str, role: str = "assistant") -> str:
        if self.drop_reasoning and role == "assistant":
            text = text.split("</think>")[-1]
        for old, new in self.content_replacements:
            text = text.replace(old, new)
        return text.strip() if self._strips(role) else text

    def _system_text(self, text: str) -> str:
        return text.strip() if self._strips("system") else text

    def _default_system(self) -> str | None:
        if self.default_system is None or "{today}" not in self.default_system:
            return self.default_system
        import datetime

        return self.default_system.replace("{today}", datetime.datetime.now().strftime("%Y-%m-%d"))

    def render(
        self, conversation: Conversation, add_generation_prompt: bool = False, tokenizer: Any = None
    ) -> list[Segment]:
        self.check(conversation)
        specials = self.special_tokens(tokenizer)
        messages = conversation.messages
        segments = [Segment(_fill(self.prefix, None, specials))]
        system = conversation.system if conversation.system is not None else self._default_system()
        user_prefix, prefix_at = None, -1
        if system is not None and self.system is not None:
            if system or not self.skip_empty_system:
                segments.append(Segment(_fill(self.system, self._system_text(system), specials)))
        elif system is not None:
            user_prefix = _fill(self.system_in_first_user or "", self._system_text(system), specials)
            if self.system_in_last_user:
                prefix_at = len(messages) - 1 if messages[-1].role == "user" else -1
            else:
                prefix_at = next(i for i, m in enumerate(messages) if m.role == "user")
        for i, message in enumerate(messages):
            if message.role == "user":
                if i != prefix_at:
                    text = self._clean(message.content, "user")
                elif self.system_outside_strip:
                    text = user_prefix + self._clean(message.content, "user")
                else:
                    text = self._clean(user_prefix + message.content, "user")
                segments.append(Segment(_fill(self.user, text, specials)))
            else:
                segments.append(Segment(_fill(self.assistant_header, None, specials)))
                segments.append(
                    Segment(_fill(self.assistant, self._clean(message.content), specials), trained=True)
                )
                segments.append(Segment(_fill(self.assistant_trailer, None, specials)))
        if add_generation_prompt:
            segments.append(Segment(_fill(self.assistant_header, None, specials)))
        return [s for s in segments if s.text]

    def to_jinja(self, image: str = IMAGE_MARKER) -> str:
        """A Jinja chat template that renders exactly what :meth:`render` does (for ``tokenizer_config``).

        A message whose content is a list of OpenAI content parts is rendered as their texts joined, each image
        part written as ``image`` (what the model's processor expands: ``<image>`` for LLaVA), as
        :func:`content_with_images` joins them.
        """

        def literal(pattern: str, content: str | None = None) -> str:
            parts = []
            for piece in _split_placeholders(pattern):
                if piece == "{content}":
                    parts.append(content or "''")
                elif piece in ("{bos_token}", "{eos_token}"):
                    parts.append(piece[1:-1])
                elif piece:
                    parts.append(json.dumps(piece))
            return " + ".join(parts) if parts else "''"

        def clean(var: str, role: str) -> str:
            expr = var
            if self.drop_reasoning and role == "assistant":
                expr = f"{expr}.split('</think>')[-1]"
            for old, new in self.content_replacements:
                expr = f"{expr}.replace({json.dumps(old)}, {json.dumps(new)})"
            return f"({expr} | trim)" if self._strips(role) else expr

        content = "content"
        sys_expr = "(system | trim)" if self._strips("system") else "system"
        default = json.dumps(self.default_system) if self.default_system is not None else "none"
        if self.default_system is not None and "{today}" in self.default_system:
            default = f"{default}.replace('{{today}}', strftime_now('%Y-%m-%d'))"
        lines = [
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
            f"{{%- else -%}}{{%- set system = {default} -%}}{{%- set loop_messages = messages -%}}{{%- endif -%}}",
            f"{{{{- {literal(self.prefix)} -}}}}",
            "{%- set ns = namespace(user_prefix=none, prefix_at=-1) -%}",
            "{%- if system is not none -%}",
        ]
        if self.system is not None:
            turn = f"{{{{- {literal(self.system, sys_expr)} -}}}}"
            lines.append(f"{{%- if system -%}}{turn}{{%- endif -%}}" if self.skip_empty_system else turn)
        elif self.system_in_first_user is not None:
            lines.append(f"{{%- set ns.user_prefix = {literal(self.system_in_first_user, sys_expr)} -%}}")
            if self.system_in_last_user:
                lines.append(
                    "{%- if loop_messages and loop_messages[-1]['role'] == 'user' -%}"
                    "{%- set ns.prefix_at = loop_messages | length - 1 -%}{%- endif -%}"
                )
            else:  # the first user message
                lines.append(
                    "{%- for message in loop_messages -%}"
                    "{%- if ns.prefix_at < 0 and message['role'] == 'user' -%}"
                    "{%- set ns.prefix_at = loop.index0 -%}{%- endif -%}{%- endfor -%}"
                )
        else:
            lines.append("{{- raise_exception('This template has no system prompt.') -}}")
        if self.system_outside_strip:
            prefixed = "ns.user_prefix + " + clean(content, "user")
        else:
            prefixed = clean(f"(ns.user_prefix + {content})", "user")
        lines += [
            "{%- endif -%}",
            "{%- for message in loop_messages -%}",
            "{%- if message['content'] is string -%}{%- set content = message['content'] -%}{%- else -%}"
            "{%- set parts = namespace(text='') -%}{%- for part in message['content'] -%}"
            "{%- if part['type'] in ('text', 'input_text', 'output_text') -%}"
            "{%- set parts.text = parts.text + part['text'] -%}"
            "{%- elif part['type'] in ('image', 'image_url', 'input_image') -%}"
            f"{{%- set parts.text = parts.text + {json.dumps(image)} -%}}"
            "{%- endif -%}{%- endfor -%}{%- set content = parts.text -%}{%- endif -%}",
            "{%- if message['role'] == 'user' -%}",
            f"{{%- if loop.index0 == ns.prefix_at -%}}{{%- set text = {prefixed} -%}}",
            "{%- else -%}{%- set text = " + clean(content, "user") + " -%}{%- endif -%}",
            f"{{{{- {literal(self.user, 'text')} -}}}}",
            "{%- elif message['role'] == 'assistant' -%}",
            f"{{{{- {literal(self.assistant_header)} -}}}}",
            f"{{{{- {literal(self.assistant, clean(content, 'assistant'))} -}}}}",
            f"{{{{- {literal(self.assistant_trailer)} -}}}}",
            "{%- else -%}{{- raise_exception('Unsupported role: ' + message['role']) -}}{%- endif -%}",
            "{%- endfor -%}",
            f"{{%- if add_generation_prompt -%}}{{{{- {literal(self.assistant_header)} -}}}}{{%- endif -%}}",
        ]
        return "".join(lines)

    @classmethod
    def from_file(cls, path: str | Path) -> TurnTemplate:
        """Load a template from a YAML or JSON file holding this class's fields."""
        import yaml

        from .inputs import read_input_text

        path = Path(path)
        text = read_input_text(path, "template file", "check the path given to --template", TemplateError)
        try:
            data = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as exc:
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TemplateError(f"template file {path} cannot be read: {problem}", "fix the file") from exc
        if not isinstance(data, dict):
            raise TemplateError(f"template file {path} must be a mapping of field: value")
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str) -> TurnTemplate:
        """Build from a dict of fields, checking every field's type; errors name ``where`` and the field."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise TemplateError(
                f"template {where} has unknown fields {', '.join(unknown)}",
                f"use only {', '.join(sorted(names))}",
            )
        values = dict(data)
        values.setdefault("name", Path(where).stem)
        for key, value in values.items():
            kind = str(names[key].type)
            if kind.startswith("bool"):
                ok = isinstance(value, bool) or (value is None and "None" in kind)
            elif kind.startswith("str"):
                ok = isinstance(value, str) or (value is None and "None" in kind)
            elif key == "stop_strings":
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
                values[key] = tuple(value) if ok else value
            else:  # content_replacements
                ok = isinstance(value, (list, tuple)) and all(
                    isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p)
                    for p in value
                )
                values[key] = tuple(tuple(p) for p in value) if ok else value
            if not ok:
                raise TemplateError(
                    f"template {where}: field '{key}' must be {_describe(kind, key)}, got {value!r}",
                    "fix the template file",
                )
        return cls(**values)


def _describe(kind: str, key: str) -> str:
    if key == "stop_strings":
        return "a list of strings"
    if key == "content_replacements":
        return "a list of [old, new] string pairs"
    base = "true or false" if kind.startswith("bool") else "a string"
    return base + (" or null" if "None" in kind else "")


def _split_placeholders(pattern: str) -> list[str]:
    """``"a{content}b"`` -> ``["a", "{content}", "b"]`` (also ``{bos_token}``, ``{eos_token}``)."""
    return [p for p in re.split(r"(\{content\}|\{bos_token\}|\{eos_token\})", pattern) if p]


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
    """Labels for ``input_ids``: the id where the token overlaps a trained span, -100 elsewhere.

    Vectorised (numpy): for each token, the first span ending after the token's start is the only one it can
    overlap (the spans are sorted and disjoint); it does when that span starts before the token ends.
    """
    import numpy as np

    if not spans or not input_ids:
        return [-100] * len(input_ids)
    ids = np.asarray(input_ids, dtype=np.int64)
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    span_bounds = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    start, end = bounds[:, 0], bounds[:, 1]
    first = np.searchsorted(span_bounds[:, 1], start, side="right")
    candidate = np.minimum(first, len(span_bounds) - 1)
    overlaps = (first < len(span_bounds)) & (span_bounds[candidate, 0] < end) & (end > start)
    return np.where(overlaps, ids, -100).tolist()


def encode_segments(
    tokenizer: Any, batch: Sequence[Sequence[Segment]], template: Template | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenize rendered conversations; returns ``(input_ids, labels)`` per conversation.

    The joined text is tokenized in one piece (so ids equal those of the rendered prompt at inference)
    without the special tokens a tokenizer adds by itself: the template writes the BOS exactly where the
    model's own template does, so it is never doubled nor missing. A token is trained when it overlaps a
    trained segment; a BOS token is never trained. With a ``template`` whose ``tokenize_per_bos`` is set,
    each piece after a BOS is tokenized on its own (Meta's Llama 2 encoding). Tokenizers without offset
    mappings (slow ones) are handled segment by segment.
    """
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is not None and bos_id == getattr(tokenizer, "eos_token_id", None):
        bos_id = None  # BOS and EOS are one token (GPT-2): it ends the assistant turns, which are trained
    if getattr(tokenizer, "is_fast", False):
        bos = (
            getattr(tokenizer, "bos_token", None)
            if template is not None and template.tokenize_per_bos
            else None
        )
        pieces = [split_at(render_text(segments), bos) for segments in batch]
        encoded = tokenizer(
            [text for sample in pieces for _, text in sample],
            add_special_tokens=False,
            return_offsets_mapping=True,
        )
        all_ids, all_labels, k = [], [], 0
        for sample, segments in zip(pieces, batch):
            sample_ids: list[int] = []
            offsets: list[tuple[int, int]] = []
            for start, _text in sample:
                sample_ids += encoded["input_ids"][k]
                offsets += [(a + start, b + start) for a, b in encoded["offset_mapping"][k]]
                k += 1
            all_ids.append(sample_ids)
            all_labels.append(
                _untrained_bos(
                    labels_from_offsets(sample_ids, offsets, trained_spans(segments)), sample_ids, bos_id
                )
            )
        return all_ids, all_labels
    all_ids, all_labels = [], []
    for segments in batch:
        sample_ids: list[int] = []
        sample_labels: list[int] = []
        for segment in segments:
            piece = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
            sample_ids.extend(piece)
            sample_labels.extend(piece if segment.trained else [-100] * len(piece))
        all_ids.append(sample_ids)
        all_labels.append(_untrained_bos(sample_labels, sample_ids, bos_id))
    return all_ids, all_labels


def split_at(text: str, marker: str | None) -> list[tuple[int, str]]:
    """``text`` cut before and after each ``marker``, as ``(offset, piece)`` pairs; whole without a marker."""
    if not marker or marker not in text:
        return [(0, text)]
    pieces, position = [], 0
    for piece in re.split(f"({re.escape(marker)})", text):
        if piece:
            pieces.append((position, piece))
        position += len(piece)
    return pieces


def _untrained_bos(labels: list[int], ids: Sequence[int], bos_id: int | None) -> list[int]:
    if bos_id is None:
        return labels
    return [-100 if token == bos_id else label for token, label in zip(ids, labels)]


def encode_prompt(tokenizer: Any, prompt: str, template: Template | None = None) -> list[int]:
    """The ids of a rendered chat prompt, tokenized exactly as training tokenizes the same text."""
    [ids], _labels = encode_segments(tokenizer, [[Segment(prompt)]], template)
    return ids
