"""Image conversations as the core's conversation records (the ``normalize_record`` hook).

Two shapes are read, each a conversation whose images are files relative to the data file (or absolute, or
``data:`` URLs):

* OpenAI style: ``{"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"},
  {"type": "text", "text": "What is this?"}]}, {"role": "assistant", "content": "A cat."}]}`` (image parts may
  also be ``{"type": "image_url", "image_url": {"url": ...}}`` or ``{"type": "image", "image": ...}``);
* LLaVA style: ``{"images": ["a.png"]}`` (or ``"image": "a.png"``) beside ``"messages"`` or ShareGPT
  ``"conversations"`` whose texts hold one ``<image>`` per image.

A record without images is left to the core (text conversations may be mixed in). Each message keeps its own
images (``images``), and the record its images in order (the ``images`` column the collator loads). Every image is
checked here: it exists, is a regular file, opens as an image of a sane size; markers and images match; images
are in user messages only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmflow_core import IMAGE_MARKER, DataError, LmflowError, content_with_images

from .vision import image_size, relative_to

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
ROLES = ("system", "user", "assistant")
#: Content parts that carry an image (as :func:`lmflow_core.content_with_images` reads them).
IMAGE_PARTS = ("image", "image_url", "input_image")


def has_images(record: Any) -> bool:
    """Whether a record carries images (an ``images``/``image`` key or an image content part)."""
    if not isinstance(record, dict):
        return False
    if record.get("images") or record.get("image"):
        return True
    messages = record.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict)
        and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") in IMAGE_PARTS for p in m["content"])
        for m in messages
    )


def normalize(record: Any, where: str, data_file: Path | None) -> tuple[str, dict[str, Any]] | None:
    """``("conversation", {"system", "messages", "images"})`` for an image record, ``None`` for any other."""
    if not has_images(record):
        return None
    base = data_file.parent if data_file is not None else Path.cwd()
    listed = record.get("images", record.get("image"))
    if isinstance(listed, str):
        listed = [listed]
    if listed is not None and (not isinstance(listed, list) or not all(isinstance(x, str) for x in listed)):
        raise DataError(f'{where}: "images" must be a list of image paths')
    pending = [relative_to(base, x) for x in listed or []]
    raw = record.get("messages", record.get("conversations"))
    if not isinstance(raw, list) or not raw:
        raise DataError(f'{where}: an image record needs "messages" (or ShareGPT "conversations")')
    system, messages = record.get("system"), []
    for i, message in enumerate(raw):
        role, content = _role_and_content(message, i, where)
        images: list[str] = []
        if isinstance(content, list):
            try:
                content, found = content_with_images(content)
            except LmflowError as exc:
                raise DataError(f"{where}: message {i}: {exc.message}", exc.hint) from None
            images = [relative_to(base, x) if isinstance(x, str) else x for x in found]
        elif not isinstance(content, str):
            raise DataError(f"{where}: message {i} content must be text or a list of content parts")
        markers = content.count(IMAGE_MARKER)
        if markers and not images:  # LLaVA style: the record's images, in the order of the markers
            if markers > len(pending):
                raise DataError(
                    f"{where}: the {IMAGE_MARKER} markers outnumber the record's {len(listed or [])} image(s)",
                    f"list one image per {IMAGE_MARKER}",
                )
            images, pending = pending[:markers], pending[markers:]
        if images and role != "user":
            raise DataError(
                f"{where}: message {i} is a {role} message with an image", "put images in user messages"
            )
        if role == "system":
            if i != 0 or system is not None:
                raise DataError(f"{where}: message {i} is a system message; only one, as the first message")
            system = content
            continue
        messages.append({"role": role, "content": content, "images": images})
    if pending:
        raise DataError(
            f"{where}: {len(pending)} of the record's images have no {IMAGE_MARKER} marker in a message",
            f"put one {IMAGE_MARKER} in the text where each image goes",
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where} has no assistant message, so nothing in it would be trained", "remove the record"
        )
    ordered = [image for m in messages for image in m["images"]]
    sizes = []
    for image in ordered:
        try:
            sizes.append(list(image_size(image, where)))
        except LmflowError as exc:
            raise DataError(exc.message, exc.hint) from None
    # The sizes are part of the record, so the tokenization cache (keyed by the records) notices a replaced image.
    return "conversation", {"system": system, "messages": messages, "images": ordered, "image_sizes": sizes}


def _role_and_content(message: Any, i: int, where: str) -> tuple[str, Any]:
    if not isinstance(message, dict):
        raise DataError(f"{where}: message {i} must be an object")
    if "from" in message:
        role = SHAREGPT_ROLES.get(str(message["from"]).lower())
        content = message.get("value")
        if role is None:
            raise DataError(
                f"{where}: message {i} is from {message['from']!r}; image conversations are from "
                f"{', '.join(SHAREGPT_ROLES)}"
            )
    else:
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; use one of {', '.join(ROLES)}")
    if content is None:
        raise DataError(f"{where}: message {i} has no content")
    return role, content
