"""Built-in conversation templates (plugin ``templates``).

Registered through the ``register_templates`` catalog hook, so they are available to ``--template`` without
selecting the plugin.
"""

from __future__ import annotations

from lmflow_core import hookimpl
from lmflow_core.templates import Template, TurnTemplate

CHATML = TurnTemplate(
    name="chatml",
    description="ChatML (<|im_start|>role ... <|im_end|>), used by Qwen, Yi, OpenHermes and the demo model",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_header="<|im_start|>assistant\n",
    assistant_end="<|im_end|>",
    assistant_trailer="\n",
    strip_content=True,
    stop_strings=("<|im_end|>",),
)

EMPTY = TurnTemplate(
    name="empty",
    description="Plain concatenation of the messages; each assistant turn ends with the tokenizer's EOS",
    system="{content}",
    user="{content}",
    assistant_end="{eos_token}",
)


@hookimpl
def register_templates() -> list[Template]:
    return [CHATML, EMPTY]
