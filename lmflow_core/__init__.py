"""lmflow: an extensible toolbox for fine-tuning, serving and measuring large language models.

The core defines the hooks (:mod:`lmflow_core.hookspecs`), finds plugins through entry points
(:mod:`lmflow_core.plugins`) and runs them (:func:`lmflow_core.train.run`). Import heavy libraries lazily: this
package is imported at every CLI start.

**The plugin API.** Everything a plugin needs is importable from ``lmflow_core`` itself, and only the names in
``__all__`` are stable: the submodules are free to change. Most names load their module on first use (PEP 562
``__getattr__``), so ``import lmflow_core`` stays cheap and never imports torch or transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DataError, LmflowError, PluginError
from .hookspecs import hookimpl
from .options import PluginOption
from .version import __version__

# Public name -> (module, name there). A public name may differ from the module's own (``model_context`` reads
# as a context object). None of them is a hook implementation: a plugin importing one must not register it.
_LAZY: dict[str, tuple[str, str]] = {
    # configuration and run/step types
    "RunConfig": ("config", "RunConfig"),
    "StepContext": ("hookspecs", "StepContext"),
    "Stash": ("stash", "Stash"),
    "StashKey": ("stash", "StashKey"),
    # templates
    "TemplateError": ("templates", "TemplateError"),
    "Template": ("templates", "Template"),
    "TurnTemplate": ("templates", "TurnTemplate"),
    "Conversation": ("templates", "Conversation"),
    "Message": ("templates", "Message"),
    "ToolCall": ("templates", "ToolCall"),
    "IMAGE_MARKER": ("templates", "IMAGE_MARKER"),
    "content_with_images": ("templates", "content_with_images"),
    "Segment": ("templates", "Segment"),
    "render_text": ("templates", "render_text"),
    "encode_segments": ("templates", "encode_segments"),
    "tojson": ("templates", "tojson"),
    "get_template": ("catalog", "get_template"),
    "available_templates": ("catalog", "available_templates"),
    # generation
    "GenerationOptions": ("generate", "GenerationOptions"),
    # reading inputs, writing outputs
    "read_input_text": ("inputs", "read_input_text"),
    "check_output_apart": ("files", "check_output_apart"),
    "check_replaceable": ("files", "check_replaceable"),
    "write_output_record": ("files", "write_output_record"),
    "move_into_place": ("files", "move_into_place"),
    "atomic_write": ("rundir", "atomic_write"),
    # the Hugging Face hub
    "hub_offline_requested": ("network", "hub_offline_requested"),
    "hub_reachable": ("network", "hub_reachable"),
    "hub_offline": ("network", "hub_offline"),
    # models and model directories
    "model_source": ("models", "model_source"),
    "demo_dataset": ("demo", "demo_dataset"),
    "lmflow_home": ("demo", "lmflow_home"),
    "load_default_tokenizer": ("models", "load_default_tokenizer"),
    "load_model_config": ("models", "load_model_config"),
    "load_pretrained": ("loading", "load_pretrained"),
    "LoadedModel": ("loading", "LoadedModel"),
    "open_session": ("inference", "open_session"),
    "evaluate_dataset": ("evaluation", "evaluate_dataset"),
    "model_context_length": ("models", "model_context"),
    "is_adapter": ("models", "is_adapter"),
    "adapter_base": ("models", "adapter_base"),
    "stored_run": ("models", "stored_run"),
    "read_json": ("models", "read_json"),
    "RUN_RECORD": ("models", "RUN_RECORD"),
    "ADAPTER_CONFIG": ("models", "ADAPTER_CONFIG"),
    # reporting and the environment of a command
    "note": ("report", "note"),
    "quiet_libraries": ("report", "quiet_libraries"),
    "free_port": ("launch", "free_port"),
}

if TYPE_CHECKING:
    from .catalog import available_templates, get_template
    from .config import RunConfig
    from .demo import demo_dataset, lmflow_home
    from .evaluation import evaluate_dataset
    from .files import (
        check_output_apart,
        check_replaceable,
        move_into_place,
        write_output_record,
    )
    from .generate import GenerationOptions
    from .hookspecs import StepContext
    from .inference import open_session
    from .inputs import read_input_text
    from .launch import free_port
    from .loading import LoadedModel, load_pretrained
    from .models import (
        ADAPTER_CONFIG,
        RUN_RECORD,
        adapter_base,
        is_adapter,
        load_default_tokenizer,
        load_model_config,
        model_source,
        read_json,
        stored_run,
    )
    from .models import model_context as model_context_length
    from .network import hub_offline, hub_offline_requested, hub_reachable
    from .report import note, quiet_libraries
    from .rundir import atomic_write
    from .stash import Stash, StashKey
    from .templates import (
        IMAGE_MARKER,
        Conversation,
        Message,
        Segment,
        Template,
        TemplateError,
        ToolCall,
        TurnTemplate,
        content_with_images,
        encode_segments,
        render_text,
        tojson,
    )

__all__ = [
    # hooks
    "hookimpl",
    # configuration and options
    "RunConfig",
    "PluginOption",
    # errors
    "LmflowError",
    "ConfigError",
    "DataError",
    "PluginError",
    "TemplateError",
    # running
    "run",
    "StepContext",
    "Stash",
    "StashKey",
    # templates
    "Template",
    "TurnTemplate",
    "Conversation",
    "Message",
    "ToolCall",
    "IMAGE_MARKER",
    "content_with_images",
    "Segment",
    "render_text",
    "encode_segments",
    "tojson",
    "get_template",
    "available_templates",
    # generation
    "GenerationOptions",
    # reading inputs, writing outputs
    "read_input_text",
    "check_output_apart",
    "check_replaceable",
    "write_output_record",
    "move_into_place",
    "atomic_write",
    # the Hugging Face hub
    "hub_offline_requested",
    "hub_reachable",
    "hub_offline",
    # models and model directories
    "model_source",
    "demo_dataset",
    "lmflow_home",
    "load_default_tokenizer",
    "load_model_config",
    "load_pretrained",
    "LoadedModel",
    "open_session",
    "evaluate_dataset",
    "model_context_length",
    "is_adapter",
    "adapter_base",
    "stored_run",
    "read_json",
    "RUN_RECORD",
    "ADAPTER_CONFIG",
    # reporting and the environment of a command
    "note",
    "quiet_libraries",
    "free_port",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Load a public name's module on first use (PEP 562)."""
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def run(config=None, **settings):
    """Fine-tune a model; see :func:`lmflow_core.train.run`."""
    from .train import run as _run

    return _run(config, **settings)
