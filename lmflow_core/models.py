"""Finding and describing models: hub ids, model directories, adapter directories, lmflow run records."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError, LmflowError

RUN_RECORD = "lmflow_run.json"
ADAPTER_CONFIG = "adapter_config.json"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or ``{}`` when it is missing or unreadable."""
    from .inputs import read_input_text

    try:
        data = json.loads(read_input_text(path))  # only a regular file: a pipe here must not hang the run
    except (LmflowError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def stored_run(source: str) -> dict[str, Any]:
    """The run record (template, block size, config...) of a model that lmflow trained; ``{}`` otherwise."""
    return read_json(Path(source) / RUN_RECORD)


def is_adapter(source: str) -> bool:
    """Whether ``source`` is a local PEFT adapter directory (e.g. the output of a LoRA run)."""
    return (Path(source) / ADAPTER_CONFIG).is_file()


def adapter_base(source: str) -> str:
    """The base model an adapter directory was trained on."""
    base = read_json(Path(source) / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not base:
        raise LmflowError(
            f"adapter {source} does not name its base model (base_model_name_or_path in {ADAPTER_CONFIG})",
            "fix adapter_config.json",
        )
    from .demo import rebuild_demo_base

    rebuild_demo_base(base)  # an adapter of the demo whose cached base was cleared
    return base


def load_model_config(source: str, trust_remote_code: bool = False, option: str = "--model") -> Any:
    """The ``PretrainedConfig`` of a hub id or local directory; a missing model is a one-line error."""
    from transformers import AutoConfig

    if is_adapter(source):
        source = adapter_base(source)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        local = Path(source).expanduser()
        if local.exists():
            problem = f"model directory {source} has no usable config.json ({str(exc).splitlines()[0]})"
        elif source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1):
            problem = f"model {source} does not exist"
        else:
            problem = f"model '{source}' is not a local directory and could not be fetched from the hub"
        raise LmflowError(
            problem, f"check {option} (a local model directory or a Hugging Face model id)"
        ) from exc


def model_context(model_config: Any) -> int | None:
    """The longest sequence a model config allows, if it says.

    Dynamic NTK RoPE scaling keeps ``max_position_embeddings`` at the pretrained length (transformers rescales
    the frequencies beyond it), so such a model's context is that length times the scaling factor.
    """
    context = getattr(model_config, "max_position_embeddings", None) or getattr(
        model_config, "n_positions", None
    )
    rope = getattr(model_config, "rope_parameters", None)
    if context and isinstance(rope, dict) and rope.get("rope_type") == "dynamic" and rope.get("factor"):
        return int(context * rope["factor"])
    return context


def block_size_for(config: Any, model_config: Any, stored: int | None = None) -> int:
    """The block size of a run (``lmflow run`` and ``lmflow data check`` both ask here).

    ``config.block_size`` (--block-size) when given, checked against the model's context; else ``stored``,
    the block size lmflow trained the model with (from its run record), when the context allows it; else the
    model's context, at most 1024.
    """
    context = model_context(model_config)
    if config.block_size is None:
        if stored and (context is None or stored <= context):
            return int(stored)
        return min(context or 1024, 1024)
    if context is not None and config.block_size > context:
        raise ConfigError(
            f"--block-size {config.block_size} exceeds the model's context of {context} tokens",
            f"use --block-size {context} or less, or extend the context with "
            f"--plugins rope_scaling --target-context {config.block_size}",
        )
    return config.block_size


def accelerator_available() -> bool:
    """Whether torch sees a GPU (or another accelerator) to compute on."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def pick_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is available, else ``"cpu"``."""
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise LmflowError(f"--device {device} needs a CUDA GPU and none is available", "use --device cpu")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str) -> Any:
    """``"auto"`` -> bfloat16 on a GPU that supports it, float32 otherwise."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def model_source(config: Any) -> str:
    """The model id or directory a run loads from (the bundled demo's saved initial weights when none is
    given)."""
    if config.model is not None:
        return config.model
    from .demo import demo_base_dir

    return str(demo_base_dir(config.seed))


def load_default_tokenizer(config: Any) -> Any:
    """The run's tokenizer as the core loads it (``--tokenizer``, else the model's own), with a pad token.

    Not itself a hook implementation, so a plugin that wraps the default can import it at module level.
    """
    from transformers import AutoTokenizer

    source = config.tokenizer or model_source(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LmflowError(
            f"cannot load a tokenizer from '{source}': {str(exc).splitlines()[0]}",
            "check --tokenizer/--model (a local directory with tokenizer files, or a hub id)",
        ) from exc
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token its EOS as pad token (padding is masked out of the loss)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LmflowError(
                "the tokenizer has neither a pad nor an EOS token",
                "add one to the tokenizer's special tokens",
            )
        tokenizer.pad_token = tokenizer.eos_token


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` stays ``"auto"``."""
    import torch

    return name if name == "auto" else getattr(torch, name)
