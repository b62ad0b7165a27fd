"""A plugin used by tests/test_loading.py: it loads the tokenizer and the model itself and records every loading
hook call, so a test can tell that a command loaded through the hooks and used what the plugin returned."""

from lmflow_core import hookimpl, load_default_tokenizer, model_source

CALLS: list[tuple[str, str]] = []  # (hook, config.model as the hook saw it)
LOADED: list = []  # every model load_model returned
USED: list[bool] = []  # for each prepare_model/prepare_inference: was the model (or its base) one of LOADED?
MARKER = "configured-by-recorder"


def reset() -> None:
    for store in (CALLS, LOADED, USED):
        store.clear()


def hook_names() -> list[str]:
    return [name for name, _ in CALLS]


@hookimpl
def load_tokenizer(config):
    CALLS.append(("load_tokenizer", config.model))
    tokenizer = load_default_tokenizer(config)
    tokenizer.loaded_by_recorder = True
    return tokenizer


@hookimpl
def configure_model(config, model_config):
    CALLS.append(("configure_model", config.model))
    model_config.recorder_marker = MARKER  # saved with any model written from it


@hookimpl
def model_init_kwargs(config):
    CALLS.append(("model_init_kwargs", config.model))
    return {"attn_implementation": "eager"}


@hookimpl
def load_model(config, model_config, init_kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    CALLS.append(("load_model", config.model))
    dtype = "auto" if config.model_dtype == "auto" else getattr(torch, config.model_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_source(config), config=model_config, **{"dtype": dtype, **init_kwargs}
    )
    LOADED.append(model)
    return model


def _is_ours(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any(base is loaded for loaded in LOADED)


@hookimpl
def prepare_model(config, model, tokenizer):
    USED.append(_is_ours(model) and getattr(tokenizer, "loaded_by_recorder", False))


@hookimpl
def prepare_inference(config, model, tokenizer):
    USED.append(_is_ours(model) and getattr(tokenizer, "loaded_by_recorder", False))
