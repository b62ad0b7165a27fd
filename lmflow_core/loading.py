"""Loading a model and its tokenizer through the hooks: one path for ``lmflow run`` and every inference command.

The steps, in the order every command takes them:

1. :func:`model_config_for`: the model's ``PretrainedConfig``, then ``configure_model``;
2. :func:`tokenizer_for`: ``load_tokenizer``;
3. :func:`weights_for`: ``model_init_kwargs`` (merged), then ``load_model``.

``lmflow run`` takes these steps itself, preparing its data between the tokenizer and the weights and calling
``prepare_model`` after them (training only). Generate, chat, serve, evaluate and merge-lora call
:func:`load_for_inference`, which takes the same steps and then applies an adapter, places the model on its
device and puts it in eval mode. For a PEFT adapter directory the hooks load its *base* model (a plugin's loader,
a quantizing one say, applies to the base) and the adapter is put on top of what ``load_model`` returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig, resolve_plugin_options
from .errors import ConfigError, LmflowError
from .models import adapter_base, is_adapter, load_model_config
from .plugins import RunPlugins, call_each, merge_each, select_plugins


@dataclass
class LoadedModel:
    """A model loaded for inference, with what loaded it.

    ``config`` holds the settings of the session (``config.model`` is what the user named, an adapter
    directory included); ``loading_config`` the settings the loading hooks saw (for an adapter: its base).
    ``plugins`` are the selected plugins; their other hooks (``prepare_inference``, ``decode``...) are
    called through ``plugins.hook``.
    """

    model: Any
    tokenizer: Any
    model_config: Any
    config: RunConfig
    loading_config: RunConfig
    plugins: RunPlugins


# --------------------------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------------------------


def model_config_for(config: RunConfig, run_plugins: RunPlugins) -> Any:
    """The model's ``PretrainedConfig``, checked by every plugin's ``validate_config`` (all problems reported at
    once), then changed by their ``configure_model``; a missing model fails here."""
    from .models import model_source

    model_config = load_model_config(model_source(config), config.trust_remote_code)
    problems = []
    for found in run_plugins.hook.validate_config(config=config, model_config=model_config):
        problems.extend(found or [])
    if problems:
        raise ConfigError.collect(problems)
    run_plugins.hook.configure_model(config=config, model_config=model_config)
    return model_config


def tokenizer_for(config: RunConfig, run_plugins: RunPlugins) -> Any:
    """The tokenizer the ``load_tokenizer`` hook returns (first result; the core's default last)."""
    return run_plugins.hook.load_tokenizer(config=config)


def merged_init_kwargs(run_plugins: RunPlugins, config: RunConfig) -> dict[str, Any]:
    """Every plugin's ``model_init_kwargs`` in one dict; one key set to two values is an error naming both."""
    return merge_each(
        call_each(run_plugins.hook.model_init_kwargs, config=config),
        lambda key: f"the model argument '{key}'",
        LmflowError,
        "run with only one of them",
    )


def weights_for(config: RunConfig, run_plugins: RunPlugins, model_config: Any) -> Any:
    """The model the ``load_model`` hook returns, given the merged ``model_init_kwargs``."""
    init_kwargs = merged_init_kwargs(run_plugins, config)
    return run_plugins.hook.load_model(config=config, model_config=model_config, init_kwargs=init_kwargs)


# --------------------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------------------


def inference_config(
    model: str,
    *,
    template: str | None = None,
    plugins: Sequence[str] = (),
    plugin_options: dict[str, dict[str, Any]] | None = None,
    extra_plugins: Any = (),
    model_dtype: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[RunConfig, RunPlugins]:
    """The settings of an inference command and its selected plugins, every problem reported at once."""
    extra = list(extra_plugins.items()) if isinstance(extra_plugins, dict) else list(extra_plugins)
    run_plugins = select_plugins(list(plugins), extra)
    config = RunConfig(
        model=model,
        template=template,
        plugins=list(run_plugins.names),
        model_dtype=model_dtype,
        trust_remote_code=trust_remote_code,
    )
    config.plugin_options = {k: dict(v) for k, v in (plugin_options or {}).items()}
    problems = resolve_plugin_options(config, run_plugins.options)
    if problems:  # the plugins' own checks (validate_config) run once the model's configuration is read
        raise ConfigError.collect(problems, "inference settings")
    return config, run_plugins


def adapter_loading_config(config: RunConfig, base: str | None = None) -> RunConfig:
    """The settings the loading hooks see for ``config.model``: the same, or for an adapter directory its base
    model (``base`` or the one the adapter names), with the adapter's own tokenizer when it has one. The copy
    shares the session's plugin options and ``stash``."""
    if not config.model or not is_adapter(config.model):
        return config
    has_tokenizer = (Path(config.model) / "tokenizer_config.json").is_file()
    return dataclasses.replace(
        config,
        model=base or adapter_base(config.model),
        tokenizer=config.tokenizer or (config.model if has_tokenizer else None),
    )


def load_for_inference(
    config: RunConfig,
    run_plugins: RunPlugins,
    *,
    device: str = "cpu",
    base: str | None = None,
    tokenizer_optional: bool = False,
) -> LoadedModel:
    """Load ``config.model`` through the loading hooks, in training's order, ready to generate.

    ``configure_model``, ``load_tokenizer``, ``model_init_kwargs`` and ``load_model`` see the model (for an
    adapter directory: its base, ``base`` when given); an adapter is then applied with peft, and the model moved
    to ``device`` (unless ``load_model`` placed it, e.g. with a ``device_map``) and put in eval mode. Plugins
    adjust the loaded model in ``prepare_inference``, which the caller calls.

    Args:
        tokenizer_optional: a model without tokenizer files of its own gets ``tokenizer=None`` instead of an
            error (merge-lora of a base without one).
    """
    adapter = config.model if config.model and is_adapter(config.model) else None
    settings = adapter_loading_config(config, base)
    model_config = model_config_for(settings, run_plugins)
    try:
        tokenizer = tokenizer_for(settings, run_plugins)
    except LmflowError:
        if not tokenizer_optional or settings.tokenizer is not None:
            raise
        tokenizer = None
    model = weights_for(settings, run_plugins, model_config)
    if adapter is not None:
        model = apply_adapter(model, adapter, settings.model, base_given=base is not None)
    if not getattr(model, "hf_device_map", None):
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, model_config, config, settings, run_plugins)


def apply_adapter(model: Any, adapter: str, base: str, base_given: bool = False) -> Any:
    """``model`` with the PEFT adapter in ``adapter`` on top (``PeftModel.from_pretrained``, inference mode)."""
    from peft import PeftModelForCausalLM

    try:
        with quiet_peft():
            return PeftModelForCausalLM.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as exc:
        fix = (
            "pass --base the model the adapter was trained on"
            if base_given
            else f"the adapter names its base in {adapter}/adapter_config.json (base_model_name_or_path): check it"
        )
        raise LmflowError(
            f"adapter {adapter} does not fit the base model {base}: {shortened(exc)}", fix
        ) from exc


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft asks the model for ``is_gradient_checkpointing``, which transformers 5 deprecates noisily."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def shortened(exc: Exception, limit: int = 160) -> str:
    """The first line of an error, cut to ``limit`` characters (peft lists every module it could not find)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def load_pretrained(
    model: str,
    *,
    base: str | None = None,
    plugins: Sequence[str] = (),
    plugin_options: dict[str, dict[str, Any]] | None = None,
    extra_plugins: Any = (),
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    tokenizer_optional: bool = False,
) -> LoadedModel:
    """Load a model (hub id, model directory or PEFT adapter directory) and its tokenizer for inference, through
    the loading hooks of the core and of ``plugins``, exactly as ``lmflow generate`` does.

    For a command a plugin adds that needs a model (``lmflow merge-lora`` loads its base here). Returns a
    :class:`LoadedModel` (``.model``, ``.tokenizer``, ``.model_config``).

    Args:
        model: what to load; an adapter directory loads its base through the hooks, then the adapter.
        base: for an adapter, the base model to load instead of the one the adapter names.
        plugins: installed plugins whose hooks take part (options in ``plugin_options``); ``extra_plugins``:
            plugin objects that are not installed, ``{name: plugin}``.
        device: where the model goes (``cpu``, ``cuda``, ``cuda:1``).
        dtype: ``auto`` (the dtype the weights are stored in), ``float32``, ``bfloat16``, ``float16``.
        tokenizer_optional: a model without a tokenizer of its own gives ``tokenizer=None``, not an error.
    """
    config, run_plugins = inference_config(
        model,
        plugins=plugins,
        plugin_options=plugin_options,
        extra_plugins=extra_plugins,
        model_dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    return load_for_inference(
        config, run_plugins, device=device, base=base, tokenizer_optional=tokenizer_optional
    )
