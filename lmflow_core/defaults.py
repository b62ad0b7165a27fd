"""The core's own hook implementations, registered in every run as the plugin ``core``.

They are ``trylast``: a selected plugin that returns a value for a first-result hook replaces the default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .data.collate import PaddingCollator
from .hookspecs import hookimpl
from .models import load_default_tokenizer, model_source, torch_dtype

if TYPE_CHECKING:
    from .templates import Segment


@hookimpl(trylast=True)
def load_tokenizer(config: Any) -> Any:
    return load_default_tokenizer(config)


@hookimpl(trylast=True)
def load_model(config: Any, model_config: Any, init_kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM, set_seed

    kwargs = {"dtype": torch_dtype(config.model_dtype), **init_kwargs}
    if config.random_init:
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
    if conversation.images:
        from .templates import TemplateError

        raise TemplateError(
            f"the conversation holds {len(conversation.images)} image(s), and no selected plugin reads images",
            "use a vision-language model with --plugins multimodal",
        )
    return template.render(conversation, add_generation_prompt, tokenizer)


@hookimpl(trylast=True)
def data_collator(config: Any, tokenizer: Any) -> Any:
    if getattr(config, "packing", False):
        from .data.packing import PackedCollator

        return PackedCollator(tokenizer)
    return PaddingCollator(tokenizer)


@hookimpl(trylast=True)
def prompt_inputs(conversation: Any) -> dict[str, Any] | None:
    if conversation.images:
        from .errors import LmflowError

        raise LmflowError(
            f"the conversation holds {len(conversation.images)} image(s), and no selected plugin reads images",
            "use a vision-language model with --plugins multimodal",
        )
    return None


@hookimpl(trylast=True)
def decode(model: Any, tokenizer: Any, input_ids: Any, options: Any, streamer: Any, inputs: Any) -> Any:
    import torch

    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        streamer=streamer,
        **(inputs or {}),
        **options.generate_kwargs(tokenizer),
    )


@hookimpl(trylast=True)
def evaluate(config: Any, model: Any, tokenizer: Any, dataset: Any) -> dict[str, float] | None:
    """Negative log-likelihood of the scored tokens (labels != -100) of every example, in nats.

    ``nll_per_sample`` is LMFlow's benchmark figure: each example's summed NLL, averaged over examples.
    Examples longer than the window (``config.block_size``, else the model's context) are read with a
    sliding window that moves by ``config.eval_stride`` tokens (default: half a window), so that every token is
    scored once, with at least ``window - stride`` tokens of context.
    """
    from .data.prepare import REJECTED_COLUMNS
    from .nll import nll_metrics

    if REJECTED_COLUMNS[0] in dataset.column_names or "images" in dataset.column_names:
        return None  # pairs, images: the plugin that trains on them measures them (pair accuracy, image NLL)
    return nll_metrics(config, model, tokenizer, dataset)
