"""Export to GGUF for llama.cpp (plugin ``gguf``): one file that llama.cpp, llama-cpp-python, Ollama and LM Studio
load.

    lmflow export gguf MODEL --output model.gguf --outtype q8_0
    lmflow run ... --plugins gguf --gguf-outtype q4_0      # also writes model.gguf into the output directory

The file holds the architecture and hyperparameters (context, RoPE base and linear, YaRN or llama3 scaling, norm
epsilon, heads and KV heads), the tokenizer (SentencePiece with scores and token types, or byte-level BPE with
merges and the pre-tokenizer's name), its special token ids, the chat template the model was trained with, and
the weights in llama.cpp's layout (see ``export.py``). A LoRA adapter is merged into its base first. Needs the ``gguf``
package (``pip install gguf``, pure Python).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmflow_core import PluginOption, hookimpl, note

from . import commands
from .export import ARCHITECTURES, OUTTYPES, ExportReport, export_gguf, permute_qk, write_gguf

if TYPE_CHECKING:
    import click

    from lmflow_core import RunConfig

__all__ = [
    "ARCHITECTURES",
    "NAME",
    "OUTTYPES",
    "RUN_OUTPUT",
    "ExportReport",
    "export_gguf",
    "permute_qk",
    "write_gguf",
]

NAME = "gguf"
RUN_OUTPUT = "model.gguf"


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``lmflow export gguf``."""
    commands.add_commands(cli)


@hookimpl
def declare_options() -> list[PluginOption]:
    """``--gguf-outtype`` (``gguf:`` section of a YAML run config)."""
    return [
        PluginOption(
            "outtype",
            str,
            "f16",
            "Type of the weight matrices in the model.gguf a run writes: f32, f16, bf16, q8_0 or q4_0.",
            choices=OUTTYPES,
        )
    ]


@hookimpl
def validate_config(config: RunConfig, model_config: Any) -> list[str]:
    """An architecture the exporter cannot write is reported before the run trains."""
    kind = getattr(model_config, "model_type", None)
    if model_config is not None and kind not in ARCHITECTURES:
        return [
            f"the gguf plugin cannot export a {kind} model; supported architectures: {', '.join(ARCHITECTURES)}"
        ]
    return []


@hookimpl
def on_train_end(config: RunConfig, output_dir: str) -> None:
    """Write ``model.gguf`` into the run's output directory, from the saved model (an adapter is merged)."""
    outtype = config.options_for(NAME).outtype
    report = export_gguf(output_dir, Path(output_dir) / RUN_OUTPUT, outtype=outtype, overwrite=True)
    note(f"wrote {report.path} ({outtype}, {report.bytes:,} bytes) for llama.cpp")
