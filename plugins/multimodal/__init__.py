"""Image + text chat models: fine-tune, evaluate and prompt vision-language models (plugin ``multimodal``).

    lmflow run --plugins multimodal --model llava-hf/llava-1.5-7b-hf --dataset images.jsonl
    lmflow run --plugins multimodal            # the embedded demo: a tiny LLaVA learns coloured shapes
    lmflow generate OUTPUT --plugins multimodal --image cat.png --prompt "What is this?"

LLaVA-family models (``LlavaForConditionalGeneration``: CLIP or SigLIP tower, projector, language model) and
Qwen2-VL / Qwen2.5-VL load through ``AutoModelForImageTextToText``. The vision tower is frozen and the projector
and language model trained by default (``--multimodal-train-vision-tower``, ``--no-multimodal-train-projector``,
``--multimodal-projector-only``). With ``lora`` the adapters go on the language model only and the projector is
trained and saved in full.

Images live in the conversations (see :mod:`.records`): each becomes its model's image tokens where its
``<image>`` marker stands (:mod:`.vision`), exactly as the model's processor expands them, in training and at
inference, through the ``format_conversation`` hook; the collator and the ``prompt_inputs`` hook add the pixel
values. Image tokens are never trained (images only stand in user messages), and an example whose image tokens
the cut to ``--block-size`` would reach is an error naming the record and the size it needs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmflow_core import (
    IMAGE_MARKER,
    ConfigError,
    DataError,
    LmflowError,
    PluginOption,
    StashKey,
    atomic_write,
    get_template,
    hookimpl,
    load_model_config,
    model_source,
    note,
)

from . import records
from .vision import Vision, family_of, image_size, load_image_processor, open_image, part_of

if TYPE_CHECKING:
    from lmflow_core import Conversation, RunConfig, Segment, Template

NAME = "multimodal"
VISION = StashKey[Vision]()
#: The evaluation examples, kept to measure answer accuracy before training.
EVAL_DATA = StashKey[Any]()
BEFORE = StashKey[float]()
#: Files of the model's processor copied next to the trained model, so AutoProcessor loads it.
PROCESSOR_FILES = ("processor_config.json", "chat_template.jinja", "chat_template.json")


@hookimpl
def declare_options() -> list[PluginOption]:
    """The ``--multimodal-*`` flags (``multimodal:`` section of a YAML run config)."""
    return [
        PluginOption("train_vision_tower", bool, False, "Train the vision tower too (frozen by default)."),
        PluginOption(
            "train_projector", bool, True, "Train the projector between the tower and the language model."
        ),
        PluginOption(
            "projector_only", bool, False, "Train the projector alone: tower and language model frozen."
        ),
        PluginOption(
            "answer_accuracy",
            bool,
            False,
            "Measure answer accuracy on the evaluation images before and after training (greedy answers; "
            "the first word must match the reference answer's).",
        ),
    ]


@hookimpl
def declare_conflicts() -> dict[str, str]:
    return {
        "speculative": "the draft model reads text only, so it cannot propose tokens after an image",
        "chunked_ce": "it computes the loss from a text model's hidden states, without the image features",
        "dpo": "preference pairs with images are not supported yet",
        "reward_model": "reward models score text only",
        "lisa": "it samples the layers of a text model's decoder, not of a vision-language model",
    }


@hookimpl
def demo_settings(given: dict[str, Any]) -> dict[str, Any]:
    """The embedded demo: a tiny seeded LLaVA and generated images of coloured shapes (built once)."""
    from .demo import DEMO_SETTINGS, demo_base_dir, demo_data_dir

    seed = given.get("seed", 42)
    data = demo_data_dir()
    settings = {
        **DEMO_SETTINGS,
        "model": str(demo_base_dir(seed)),
        "dataset": str(data / "train.jsonl"),
        "eval_dataset": str(data / "eval.jsonl"),
        "template": "chatml",
        "sample_prompts": [],
        NAME: {"answer_accuracy": True},
    }
    return settings


# --------------------------------------------------------------------------------------------------------------
# Checks and loading
# --------------------------------------------------------------------------------------------------------------


@hookimpl
def validate_config(config: RunConfig, model_config: Any) -> list[str]:
    options = config.options_for(NAME)
    problems = []
    if family_of(model_config) is None:
        problems.append(
            f"--model {config.model} is a {getattr(model_config, 'model_type', 'text')} model, not a "
            "vision-language model this plugin reads (LLaVA, Qwen2-VL, Qwen2.5-VL); pass one, or drop "
            "--plugins multimodal"
        )
    if getattr(config, "packing", False):
        problems.append(
            "--packing joins examples into one row, and a vision-language model matches image features to the "
            "image tokens of the whole row; drop --packing with --plugins multimodal"
        )
    uses_lora = "lora" in config.plugins
    if options.projector_only and options.train_vision_tower:
        problems.append(
            "--multimodal-projector-only freezes the vision tower, but --multimodal-train-vision-tower trains it; "
            "pass one of them"
        )
    if options.projector_only and not options.train_projector:
        problems.append(
            "--multimodal-projector-only with --no-multimodal-train-projector trains nothing; drop one"
        )
    if uses_lora and (options.train_vision_tower or options.projector_only):
        problems.append(
            "with --plugins lora the adapters train the language model, the projector is trained in full and the "
            "vision tower stays frozen; drop --multimodal-train-vision-tower / --multimodal-projector-only"
        )
    return problems


def vision_for(config: RunConfig, tokenizer: Any) -> Vision:
    """The run's (or the session's) :class:`Vision`, loaded once."""
    vision = config.stash.get(VISION, None)
    if vision is None or vision.tokenizer is not tokenizer:
        source = model_source(config)
        model_config = load_model_config(source, config.trust_remote_code)
        family = family_of(model_config)
        if family is None:
            raise LmflowError(
                f"{source} is a {getattr(model_config, 'model_type', 'text')} model, not a vision-language model",
                "pass a LLaVA or Qwen2-VL model with --plugins multimodal",
            )
        image_processor = load_image_processor(source, config.trust_remote_code)
        vision = Vision(family, image_processor, tokenizer, model_config)
        config.stash[VISION] = vision
    return vision


@hookimpl
def load_model(config: RunConfig, model_config: Any, init_kwargs: dict[str, Any]) -> Any:
    """``AutoModelForImageTextToText`` (from the config, seeded, with ``--random-init``)."""
    import torch
    from transformers import AutoModelForImageTextToText, set_seed

    kwargs = dict(init_kwargs)
    dtype = kwargs.pop("dtype", None)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype is not None and dtype != "auto":
        kwargs["dtype"] = dtype
    if config.random_init:
        set_seed(config.seed)
        return AutoModelForImageTextToText.from_config(
            model_config, trust_remote_code=config.trust_remote_code, **kwargs
        )
    return AutoModelForImageTextToText.from_pretrained(
        model_source(config), config=model_config, trust_remote_code=config.trust_remote_code, **kwargs
    )


@hookimpl
def prepare_model(config: RunConfig, model: Any, tokenizer: Any) -> None:
    """Freeze the parts the options leave out; measure answer accuracy before training when asked."""
    options = config.options_for(NAME)
    if "lora" not in config.plugins:  # under lora the adapters decide (lora's own prepare_model)
        trained = {
            "vision_tower": options.train_vision_tower,
            "projector": options.train_projector,
            "language_model": not options.projector_only,
        }
        counts = dict.fromkeys(trained, 0)
        for name, parameter in model.named_parameters():
            part = part_of(name)
            parameter.requires_grad_(trained[part])
            counts[part] += getattr(parameter, "ds_numel", None) or parameter.numel()  # ZeRO-3 partitions
        note(
            "multimodal: training "
            + ", ".join(f"{part.replace('_', ' ')} ({counts[part]:,})" for part in trained if trained[part])
            + "; frozen: "
            + (
                ", ".join(
                    f"{part.replace('_', ' ')} ({counts[part]:,})" for part in trained if not trained[part]
                )
                or "none"
            )
        )
        if getattr(config, "gradient_checkpointing", False) and not options.train_vision_tower:
            model.enable_input_require_grads()  # checkpointed blocks after a frozen tower still need gradients
    eval_data = config.stash.get(EVAL_DATA, None)
    if options.answer_accuracy and eval_data is not None and _main_process():
        from .accuracy import answer_accuracy

        config.stash[BEFORE] = answer_accuracy(model, tokenizer, vision_for(config, tokenizer), eval_data)


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


@hookimpl
def normalize_record(config: RunConfig, record: Any, where: str, data_file: Path | None) -> Any:
    normalized = records.normalize(record, where, data_file)
    if normalized is not None:
        normalized[1]["source"] = where
    return normalized


@hookimpl
def format_conversation(
    config: RunConfig,
    template: Template,
    conversation: Conversation,
    add_generation_prompt: bool,
    tokenizer: Any,
) -> list[Segment] | None:
    """Each image as its model's image tokens where its marker stands; the template renders the rest."""
    if not conversation.images:
        return None
    vision = vision_for(config, tokenizer)
    messages = []
    for message in conversation.messages:
        content = message.content
        if message.images:
            pieces = content.split(IMAGE_MARKER)
            expanded = [pieces[0]]
            for image, piece in zip(message.images, pieces[1:]):
                expanded += [vision.placeholder(image_size(image)), piece]
            content = "".join(expanded)
        messages.append(dataclasses.replace(message, content=content, images=()))
    text_only = dataclasses.replace(conversation, messages=messages)
    return template.render(text_only, add_generation_prompt, tokenizer)


@hookimpl
def prepare_dataset(config: RunConfig, dataset: Any, tokenizer: Any, split: str) -> Any:
    """Refuse examples whose image tokens the cut reached; keep the evaluation examples for the accuracy."""
    if "images" not in dataset.column_names:
        return None
    vision = vision_for(config, tokenizer)
    if "full_length" in dataset.column_names:
        cut = [
            i for i, (n, ids) in enumerate(zip(dataset["full_length"], dataset["input_ids"])) if n > len(ids)
        ]
        for i in cut:
            example = dataset[i]
            expected = sum(vision.tokens_for(image_size(x)) for x in example["images"] or ())
            kept = sum(1 for t in example["input_ids"] if t == vision.image_token_id)
            if kept < expected:
                raise DataError(
                    f"{example['source']}: its {expected} image tokens do not fit in --block-size "
                    f"{config.block_size} (the example needs {example['full_length']} tokens)",
                    f"raise --block-size to {example['full_length']} or shorten the record",
                )
        dataset = dataset.remove_columns(["full_length"])
    if split == "eval":
        config.stash[EVAL_DATA] = dataset
    return dataset


@hookimpl
def data_collator(config: RunConfig, tokenizer: Any) -> Any:
    from .collate import ImageCollator

    return ImageCollator(vision_for(config, tokenizer), tokenizer.pad_token_id)


# --------------------------------------------------------------------------------------------------------------
# Saving, inference and evaluation
# --------------------------------------------------------------------------------------------------------------


def save_processor(config: RunConfig, tokenizer: Any, directory: str) -> None:
    """Write the image processor (and the processor's own files) next to the model, for AutoProcessor, and
    the run's template as the chat template with images written as the model's processor expects them."""
    vision = vision_for(config, tokenizer)
    vision.image_processor.save_pretrained(directory)
    source = Path(model_source(config))
    for name in PROCESSOR_FILES:
        if (source / name).is_file() and not (Path(directory) / name).exists():
            shutil.copyfile(source / name, Path(directory) / name)
    template = get_template(config.template) if config.template else None
    jinja = template.to_jinja(image=vision.template_image) if template is not None else None
    if jinja:
        atomic_write(Path(directory) / "chat_template.jinja", jinja)


@hookimpl
def on_checkpoint_save(config: RunConfig, checkpoint_dir: str, is_main_process: bool) -> None:
    if is_main_process and config.stash.get(VISION, None) is not None:
        save_processor(config, config.stash[VISION].tokenizer, checkpoint_dir)


@hookimpl
def on_train_end(config: RunConfig, model: Any, tokenizer: Any, output_dir: str) -> None:
    save_processor(config, tokenizer, output_dir)


@hookimpl
def prompt_inputs(config: RunConfig | None, model: Any, tokenizer: Any, conversation: Conversation) -> Any:
    """The pixel inputs of the conversation's images, in the model's floating dtype."""
    if not conversation.images:
        return None
    if config is None:
        raise ConfigError("images need the session's settings", "open the model with plugins=['multimodal']")
    vision = vision_for(config, tokenizer)
    inputs = vision.pixel_inputs([open_image(x) for x in conversation.images])
    dtype = getattr(model, "dtype", None)
    return {k: v.to(dtype) if v.is_floating_point() and dtype is not None else v for k, v in inputs.items()}


@hookimpl
def evaluate(config: RunConfig, model: Any, tokenizer: Any, dataset: Any) -> dict[str, float] | None:
    """NLL of the trained tokens with their images, and answer accuracy (before and after) when asked."""
    if "images" not in dataset.column_names:
        return None
    from .accuracy import answer_accuracy, image_nll

    vision = vision_for(config, tokenizer)
    metrics = image_nll(model, vision, tokenizer, dataset, config.eval_batch_size or config.batch_size)
    if config.options_for(NAME).answer_accuracy:
        metrics["answer_accuracy"] = answer_accuracy(model, tokenizer, vision, dataset)
        before = config.stash.get(BEFORE, None)
        if before is not None:
            metrics["answer_accuracy_before"] = before
    return metrics
