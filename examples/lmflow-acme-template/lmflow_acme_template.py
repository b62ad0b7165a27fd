"""The ACME chat format: '<|acme:role|>' headers, turns closed by '<|acme:end|>'."""

from __future__ import annotations

from lmflow_core import TurnTemplate, hookimpl

ACME = TurnTemplate(
    name="acme",
    description="ACME in-house chat format (<|acme:role|> ... <|acme:end|>)",
    prefix="{bos_token}",
    system="<|acme:system|>{content}<|acme:end|>\n",
    user="<|acme:user|>{content}<|acme:end|>\n",
    assistant_header="<|acme:assistant|>",
    assistant="{content}<|acme:end|>",
    assistant_trailer="\n",
    strip_content=True,
    stop_strings=("<|acme:end|>",),
)


@hookimpl
def register_templates():
    return [ACME]
