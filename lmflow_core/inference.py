"""An inference session: a loaded model, its tokenizer, its template and the plugins that decode with it.

``lmflow generate``, ``chat``, ``serve`` and ``evaluate`` all open one. The model may be a hub id, a model
directory or a PEFT adapter directory (its base model is loaded and the adapter applied). The model and its
tokenizer are loaded through the loading hooks, in the order ``lmflow run`` calls them
(:func:`lmflow_core.loading.load_for_inference`). The template comes
from ``--template``, else from the record lmflow stored with the model, else the tokenizer's own chat template.

    from lmflow_core.inference import open_session
    session = open_session("output")
    print(session.chat([{"role": "user", "content": "What is the opposite of hot?"}]).text)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import get_template
from .config import RunConfig
from .errors import LmflowError
from .generate import Generation, GenerationOptions, generate_text, reply
from .models import model_context, pick_device, pick_dtype, stored_run
from .plugins import RunPlugins
from .templates import Conversation, Template


@dataclass
class InferenceSession:
    """A model ready to generate. Create it with :func:`open_session`."""

    config: RunConfig
    plugins: RunPlugins
    model: Any
    tokenizer: Any
    template: Template | None
    template_name: str | None
    context: int | None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The model's name as the API reports it."""
        return Path(self.config.model).name if Path(self.config.model).exists() else str(self.config.model)

    @property
    def reads_images(self) -> bool:
        """Whether a selected plugin reads images (implements ``prompt_inputs``, e.g. ``multimodal``); the core
        alone refuses conversations with images."""
        return any(
            not impl.function.__module__.startswith("lmflow_core.")
            for impl in self.plugins.hook.prompt_inputs.get_hookimpls()
        )

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Conversation,
        options: GenerationOptions | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """The assistant's next message after ``messages`` (a leading system message is the system prompt)."""
        if self.template is None:
            raise LmflowError(
                f"model {self.config.model} has no conversation template (none stored with it, and its tokenizer "
                "has no chat template)",
                "pass --template NAME (see `lmflow templates list`)",
            )
        conversation = (
            messages if isinstance(messages, Conversation) else Conversation.from_messages(messages)
        )
        return reply(
            self.plugins.hook,
            self.model,
            self.tokenizer,
            self.template,
            conversation,
            options or GenerationOptions(),
            on_text,
            self.config,
        )

    def complete(
        self,
        prompt: str,
        options: GenerationOptions | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Continue a raw prompt (no template); stops at EOS and the options' stop strings."""
        return generate_text(
            self.plugins.hook,
            self.model,
            self.tokenizer,
            prompt,
            options or GenerationOptions(),
            on_text,
            self.config,
            add_special_tokens=True,
        )


def open_session(
    model: str,
    *,
    template: str | None = None,
    plugins: Sequence[str] = (),
    plugin_options: dict[str, dict[str, Any]] | None = None,
    extra_plugins: Any = (),
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> InferenceSession:
    """Load ``model`` for inference with the given plugins; everything a user can get wrong fails first.

    Args:
        model: hub id, model directory or adapter directory.
        template: template name or file; default: the stored one, else ``tokenizer`` if the tokenizer has a
            chat template, else none (only raw prompts then).
        plugins: installed plugins to use (e.g. ``["speculative"]``); their options in ``plugin_options``.
        extra_plugins: plugin objects that are not installed, ``{name: plugin}``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        dtype: ``auto`` (bfloat16 on a GPU that has it, else float32), ``float32``, ``bfloat16``, ``float16``.
    """
    import sys

    from .loading import inference_config, load_for_inference
    from .report import Reporter, quiet_libraries, reporting

    quiet_libraries()
    device = pick_device(device)
    dtype_name = str(pick_dtype(dtype, device)).removeprefix("torch.")
    config, run_plugins = inference_config(
        model,
        template=template,
        plugins=plugins,
        plugin_options=plugin_options,
        extra_plugins=extra_plugins,
        model_dtype=dtype_name,
        trust_remote_code=trust_remote_code,
    )
    record = stored_run(model)
    template_name = template or record.get("template")
    chosen = get_template(template_name) if template_name else None

    # A plugin's notes go to stderr: stdout carries what generate, chat and evaluate print.
    with reporting(Reporter(stream=sys.stderr)):
        loaded = load_for_inference(config, run_plugins, device=device)
        tokenizer = loaded.tokenizer
        if chosen is None and getattr(tokenizer, "chat_template", None):
            template_name, chosen = "tokenizer", get_template("tokenizer")
        run_plugins.hook.prepare_inference(config=config, model=loaded.model, tokenizer=tokenizer)
    return InferenceSession(
        config,
        run_plugins,
        loaded.model,
        tokenizer,
        chosen,
        template_name,
        model_context(loaded.model_config),
        record,
    )
