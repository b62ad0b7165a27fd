"""Longer context through RoPE scaling (plugin ``rope_scaling``): position interpolation and its successors.

The rotary position embeddings of a Llama, Mistral, Qwen2/3, Phi-3 or Gemma model are stretched so that the
model reads sequences longer than it was pretrained on; fine-tuning on such sequences then adapts it to them.

    lmflow run --model M --dataset D --plugins rope_scaling --rope-type yarn --target-context 16384 --block-size 16384

* ``--rope-type``: ``linear`` (position interpolation, Chen et al., arXiv 2306.15595), ``dynamic`` (NTK-aware
  scaling that grows with the sequence), ``yarn`` (Peng et al., arXiv 2309.00071) or ``llama3`` (the
  frequency-dependent scaling of Llama 3.1).
* ``--rope-factor F`` stretches the context F times; ``--target-context N`` derives F from the model's context.

The scaling is written into the model's config (``rope_parameters``, and ``max_position_embeddings`` becomes the
extended length except for ``dynamic``, whose algorithm needs the pretrained length there), so transformers'
own implementation computes it, the saved model carries it, and ``lmflow generate/chat/serve/evaluate`` use it
with no flag. The block size may then go up to the extended context. transformers' Phi-3 config accepts only
``longrope`` parameters: there the frequencies that transformers computes for the requested type are stored in
that form (per-frequency factors and attention factor, the same at every length); ``dynamic`` has no such form.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

from lmflow_core import ConfigError, LmflowError, PluginOption, hookimpl, model_context_length, note

if TYPE_CHECKING:
    from lmflow_core import RunConfig

NAME = "rope_scaling"
ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
# Llama 3.1's published values for the frequency bands of llama3 scaling.
LLAMA3_FREQ_FACTORS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
# Only dynamic scaling reads max_position_embeddings as the pretrained length at run time.
KEEPS_PRETRAINED_LENGTH = ("dynamic",)
EQUIVALENT_NOTE = "the only scaling transformers accepts for this architecture"


@hookimpl
def declare_options() -> list[PluginOption]:
    """``--rope-type``, ``--rope-factor`` and ``--target-context`` (``rope_scaling:`` section of a YAML config)."""
    return [
        PluginOption(
            "rope_type",
            str,
            "linear",
            "How positions are stretched: linear, dynamic, yarn or llama3.",
            flag="--rope-type",
            choices=ROPE_TYPES,
        ),
        PluginOption(
            "factor",
            float,
            None,
            "Stretch the model's context this many times (at least 1).",
            flag="--rope-factor",
            min=1.0,
        ),
        PluginOption(
            "target_context",
            int,
            None,
            "Context length to reach, in tokens; the factor is this divided by the model's context.",
            flag="--target-context",
            min=1,
        ),
    ]


@hookimpl
def declare_conflicts() -> dict[str, str]:
    return {
        "lora": "a LoRA adapter does not carry the base model's config, so the RoPE scaling would be lost when "
        "the adapter is loaded; merge a LoRA run first or fine-tune the whole model",
    }


@hookimpl
def validate_config(config: RunConfig) -> list[str]:
    options = config.options_for(NAME)
    if options.factor is None and options.target_context is None:
        return ["the rope_scaling plugin needs --rope-factor F or --target-context N (tokens)"]
    if options.factor is not None and options.target_context is not None:
        return ["--rope-factor and --target-context both set the scaling: pass only one of them"]
    return []


@hookimpl
def configure_model(config: RunConfig, model_config: Any) -> None:
    """Write the scaling into the model config before the weights load (and before the block size check)."""
    options = config.options_for(NAME)
    before = _pretrained_context(model_config)
    stored = apply_rope_scaling(
        model_config, options.rope_type, factor=options.factor, target_context=options.target_context
    )
    if stored is None:
        note(
            f"the model already uses this RoPE scaling (context {model_context_length(model_config)} tokens)"
        )
        return
    factor = _scaled_parameters(model_config)[0]["factor"]
    how = (
        f" (stored as equivalent {stored} parameters, {EQUIVALENT_NOTE})"
        if stored != options.rope_type
        else ""
    )
    note(
        f"RoPE scaling: {options.rope_type}, factor {factor:g}: context {before} -> "
        f"{model_context_length(model_config)} tokens{how}"
    )


def apply_rope_scaling(
    model_config: Any, rope_type: str, factor: float | None = None, target_context: int | None = None
) -> str | None:
    """Scale the RoPE of ``model_config`` in place, as transformers' config constructor would with ``rope_scaling``.

    Architectures whose config accepts only ``longrope`` scaling (Phi-3) get the same frequencies as
    ``longrope`` parameters: the per-frequency factors and attention factor that transformers' own function for
    ``rope_type`` computes, used for every length (``dynamic`` has no such form and is refused there).

    Args:
        model_config: a transformers ``PretrainedConfig`` of a RoPE model (loaded, or built in code).
        rope_type: ``linear``, ``dynamic``, ``yarn`` or ``llama3``.
        factor: how many times longer the context becomes (at least 1).
        target_context: the context to reach, in tokens (instead of ``factor``).

    Returns:
        The ``rope_type`` written into the config (``rope_type`` itself, or ``longrope``), or ``None`` when the
        config already had this scaling and was left as it was.

    Raises:
        LmflowError: for a model without RoPE, a factor below 1, a model that is already scaled differently, or a
            scaling that transformers does not support for this architecture.
    """
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"unknown --rope-type {rope_type!r}", f"use one of {', '.join(ROPE_TYPES)}")
    if (factor is None) == (target_context is None):
        raise ConfigError("give exactly one of --rope-factor and --target-context")
    kind = getattr(model_config, "model_type", "this")
    targets = _scaled_parameters(model_config)
    if any(params.get("rope_type", "default") != "default" for params in targets):
        _check_already_scaled(model_config, targets, rope_type, factor, target_context)
        return None
    original = _pretrained_context(model_config)
    if original is None:
        raise LmflowError(
            f"the {kind} model config has no max_position_embeddings to scale from",
            "set it in config.json to the length the model was pretrained with",
        )
    if target_context is not None:
        factor = target_context / original
        if factor < 1:
            raise ConfigError(
                f"--target-context {target_context} is shorter than the model's context of {original} tokens "
                f"(a factor of {factor:.3g}, below 1)",
                f"pass a --target-context above {original}, or leave out the rope_scaling plugin",
            )
    assert factor is not None
    if not math.isfinite(factor) or factor < 1:
        raise ConfigError(
            f"--rope-factor {factor:g} is below 1: RoPE scaling only lengthens the context", "pass 1 or more"
        )

    extended = target_context or int(original * factor)
    scaled = _parameters_for(rope_type, factor, original)
    problem = _rejection(model_config, scaled, rope_type, original, extended)
    if problem is not None and rope_type != "dynamic":
        longrope = _as_longrope(model_config, scaled, rope_type, factor, original, extended)
        if _rejection(model_config, longrope, rope_type, original, extended) is None:
            scaled, problem = longrope, None
    if problem is not None:
        raise LmflowError(
            f"transformers does not support --rope-type {rope_type} for {kind} models ({problem})",
            "choose another --rope-type",
        )
    _write(model_config, scaled, rope_type, original, extended)
    model_config.standardize_rope_params()
    return scaled["rope_type"]


def _rejection(
    model_config: Any, scaled: dict[str, Any], rope_type: str, original: int, extended: int
) -> str | None:
    """Why transformers refuses these parameters for this config (checked on a copy), or ``None``."""
    candidate = copy.deepcopy(model_config)
    _write(candidate, scaled, rope_type, original, extended)
    try:
        candidate.standardize_rope_params()
        candidate.validate_rope()
    except (ValueError, KeyError, TypeError) as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
    return None


def _as_longrope(
    model_config: Any, scaled: dict[str, Any], rope_type: str, factor: float, original: int, extended: int
) -> dict[str, Any]:
    """``longrope`` parameters giving the frequencies that transformers computes for ``scaled``, at any length."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    probe = copy.deepcopy(model_config)
    _write(probe, scaled, rope_type, original, extended)
    inv_freq, attention = ROPE_INIT_FUNCTIONS[rope_type](probe)
    _write(probe, {"rope_type": "linear", "factor": 1.0}, "linear", original, extended)
    unscaled, _ = ROPE_INIT_FUNCTIONS["linear"](probe)
    per_frequency = (unscaled / inv_freq).tolist()
    return {
        "rope_type": "longrope",
        "factor": float(factor),
        "short_factor": per_frequency,
        "long_factor": per_frequency,
        "attention_factor": float(attention),
        "original_max_position_embeddings": int(original),
    }


def _scaled_parameters(model_config: Any) -> list[dict[str, Any]]:
    """The RoPE parameter dicts that scaling changes: the model's one dict, or its full-attention layers' dict.

    Models with per-layer-type RoPE (Gemma 3) scale only the full-attention layers, as their published long-context
    configs do: sliding-window layers never see a distance beyond their window.
    """
    rope = getattr(model_config, "rope_parameters", None)
    if not isinstance(rope, dict) or not rope:
        kind = getattr(model_config, "model_type", "this")
        raise LmflowError(
            f"{kind} models do not use rotary position embeddings (RoPE), so their context cannot be scaled",
            "use a RoPE model (Llama, Mistral, Qwen2/3, Gemma...), or leave out the rope_scaling plugin",
        )
    nested = (
        model_config.nested_rope_parameter_keys(rope)
        if hasattr(model_config, "nested_rope_parameter_keys")
        else []
    )
    if not nested:
        return [rope]
    keys = ["full_attention"] if "full_attention" in nested else nested
    return [rope[key] for key in keys if isinstance(rope.get(key), dict)]


def _pretrained_context(model_config: Any) -> int | None:
    return getattr(model_config, "max_position_embeddings", None)


def _parameters_for(rope_type: str, factor: float, original: int) -> dict[str, Any]:
    """The ``rope_parameters`` keys transformers expects for ``rope_type`` (see ``RopeParameters``)."""
    params: dict[str, Any] = {"rope_type": rope_type, "factor": float(factor)}
    if rope_type == "llama3":
        params.update(LLAMA3_FREQ_FACTORS)
    if rope_type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = int(original)
    return params


def _write(model_config: Any, scaled: dict[str, Any], rope_type: str, original: int, extended: int) -> None:
    """Put the scaling into ``model_config``, keeping each dict's own ``rope_theta`` and rotary fraction."""
    for params in _scaled_parameters(model_config):
        kept = {k: params[k] for k in ("rope_theta", "partial_rotary_factor") if k in params}
        params.clear()
        params.update(kept)
        params.update(scaled)
    if rope_type not in KEEPS_PRETRAINED_LENGTH:
        model_config.max_position_embeddings = int(extended)
    if hasattr(model_config, "original_max_position_embeddings"):
        # Phi-3 style configs keep the pretrained length next to max_position_embeddings.
        model_config.original_max_position_embeddings = int(original)


def _check_already_scaled(
    model_config: Any,
    targets: list[dict[str, Any]],
    rope_type: str,
    factor: float | None,
    target_context: int | None,
) -> None:
    """A model saved by an earlier rope_scaling run keeps its scaling; asking for another one is an error."""
    params = targets[0]
    existing_type, existing_factor = params.get("rope_type"), params.get("factor")
    context = model_context_length(model_config) or 0
    # A Phi-3 style config holds the scaling as its longrope equivalent (see apply_rope_scaling).
    same_type = existing_type == rope_type or (existing_type == "longrope" and rope_type != "dynamic")
    if same_type and target_context is not None and target_context <= context:
        return
    if same_type and factor is not None and existing_factor is not None:
        if math.isclose(float(existing_factor), factor, rel_tol=1e-9):
            return
    raise LmflowError(
        f"the model already uses {existing_type} RoPE scaling (factor {existing_factor}, context {context} "
        f"tokens), so --rope-type {rope_type} "
        + (f"--target-context {target_context}" if target_context else f"--rope-factor {factor:g}")
        + " would scale it twice",
        "start from the unscaled model, or leave out the rope_scaling plugin to keep the stored scaling",
    )
