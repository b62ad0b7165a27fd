"""Vocabulary extension (plugin ``vocab_extension``): teach a tokenizer a new language or domain.

Two steps. ``lmflow vocab extend`` trains a SentencePiece model on the user's corpus and appends the pieces the
base tokenizer lacks; ``lmflow run --tokenizer DIR --plugins vocab_extension`` then grows the model's embeddings
and LM head for them and fine-tunes.

    lmflow vocab extend --corpus docs/ --base BASE_TOKENIZER --vocab-size 8000 --output tokenizer-ext
    lmflow run --model M --tokenizer tokenizer-ext --plugins vocab_extension --dataset D [--train-new-embeddings-only]

How the pieces are added, and why:

* **SentencePiece tokenizers** (a LLaMA-2 style ``tokenizer.model``): the new pieces are appended to the base's
  ``ModelProto``, after every existing piece, with scores that rank them below the base's own pieces in the
  order the corpus model ranked them. The base's pieces keep their ids and merge first; the new ones then
  join what is left. The trainer uses the base's own normalisation and splitting rules, so every new piece is
  one the base's segmentation can reach.
* **Byte-level BPE tokenizers** (a ``tokenizer.json`` of Llama-3, Qwen or GPT-2 style): each new piece becomes a
  vocabulary entry *and a merge* appended after the base's merges, never an "added token". Added tokens are
  cut out of the text before pre-tokenisation, wherever they occur (inside other words too), and decode
  outside the byte-level decoder; a merge takes part in ordinary BPE within a pre-token, so encoding of text
  without the new pieces is unchanged and every id sequence still decodes byte for byte. A piece is added
  when the base's pre-tokeniser keeps it in one pre-token and the segmentation of its text (by the base plus
  the shorter pieces added before it) has two parts, which the new merge joins; the others are counted as
  skipped.

In both cases every old token keeps its id and ``decode(encode(text))`` is unchanged for any text. The output
directory is a transformers tokenizer directory (plus ``tokenizer.model`` for SentencePiece) with
``vocab_extension.json``, the report: pieces added and the corpus's tokens per character before and after.

During a run, new embedding rows (and LM head rows) start as the mean of the rows of the pieces the model's own
tokenizer splits the new token into. ``--train-new-embeddings-only`` freezes everything else and masks the
gradients of the old rows, so only the new rows change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmflow_core import ConfigError, LmflowError, PluginOption, hookimpl, model_source, note

from . import commands
from .bpe import extend_byte_level_bpe
from .corpus import Corpus, read_corpus
from .embeddings import old_pieces, resize_and_initialise, train_rows_only
from .extend import REPORT_FILE, ExtensionReport, extend_vocabulary
from .pieces import extend_sentencepiece, train_pieces
from .tokenizer import (
    BYTE_LEVEL_BPE,
    CONFIG_FILES,
    SENTENCEPIECE,
    SP_MODEL,
    TOKENIZER_JSON,
    BaseTokenizer,
    find_base,
    load_tokenizer_dir,
)

if TYPE_CHECKING:
    import click

    from lmflow_core import RunConfig, StepContext

__all__ = [
    "BYTE_LEVEL_BPE",
    "CONFIG_FILES",
    "NAME",
    "REPORT_FILE",
    "SENTENCEPIECE",
    "SP_MODEL",
    "TOKENIZER_JSON",
    "BaseTokenizer",
    "Corpus",
    "ExtensionReport",
    "check_extends",
    "extend_byte_level_bpe",
    "extend_sentencepiece",
    "extend_vocabulary",
    "find_base",
    "load_tokenizer_dir",
    "model_tokenizer",
    "old_pieces",
    "read_corpus",
    "resize_and_initialise",
    "train_pieces",
    "train_rows_only",
]

NAME = "vocab_extension"


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``lmflow vocab extend``."""
    commands.add_commands(cli)


# --------------------------------------------------------------------------------------------------------------
# Fine-tuning with the extended tokenizer
# --------------------------------------------------------------------------------------------------------------


@hookimpl
def declare_options() -> list[PluginOption]:
    """``--train-new-embeddings-only`` (``vocab_extension:`` section of a YAML config)."""
    return [
        PluginOption(
            "train_new_embeddings_only",
            bool,
            False,
            "Train only the new tokens' embedding and LM head rows; everything else stays frozen.",
            flag="--train-new-embeddings-only",
        )
    ]


@hookimpl
def declare_conflicts() -> dict[str, str]:
    return {
        "lora": "a LoRA adapter does not carry resized embeddings that a base model loads; extend the vocabulary "
        "with a full fine-tuning run first",
        "zero3": "ZeRO-3 partitions the embedding matrix across processes before it can be resized here; resize "
        "it in a run without zero3 (or with zero2 / DDP) first",
    }


@hookimpl
def validate_config(config: RunConfig) -> list[str]:
    problems = []
    if not config.tokenizer:
        problems.append(
            "the vocab_extension plugin needs --tokenizer DIR: the extended tokenizer written by "
            "`lmflow vocab extend`"
        )
    if config.options_for(NAME).train_new_embeddings_only:
        # The row mask sits on the embedding parameters themselves: engines that replace or shard them, and
        # plugins that make other weights trainable, would quietly train more than the new rows.
        for other, why in (
            ("lisa", "lisa makes decoder layers trainable"),
            ("fsdp", "fsdp replaces the embedding parameters with sharded ones"),
            ("zero2", "zero2 updates its own copy of the weights"),
        ):
            if other in config.plugins:
                problems.append(
                    f"--train-new-embeddings-only cannot be combined with --plugins {other} ({why}); train the "
                    f"new rows in a run without {other}"
                )
    return problems


@hookimpl(wrapper=True)
def load_tokenizer(config: RunConfig) -> Any:
    """Check, before any model loads, that the tokenizer the run loads (``--tokenizer``, by the core's loader or
    a plugin's) extends the model's own tokenizer."""
    tokenizer = yield
    base = model_tokenizer(config)
    check_extends(base, tokenizer, config.tokenizer)
    new = len(tokenizer) - len(base)
    if new <= 0:
        if config.options_for(NAME).train_new_embeddings_only:
            raise ConfigError(
                f"--tokenizer {config.tokenizer} has no token beyond the model's own {len(base):,}, so "
                "--train-new-embeddings-only has nothing to train",
                "pass the extended tokenizer, or leave out --train-new-embeddings-only",
            )
        note(
            f"--tokenizer {config.tokenizer} adds no token to the model's own; the embeddings stay as they are"
        )
    return tokenizer


def model_tokenizer(config: RunConfig) -> Any:
    """The tokenizer stored with the run's model: it tells which tokens are new and how to split them."""
    from transformers import AutoTokenizer

    source = model_source(config)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LmflowError(
            f"the model {source} has no tokenizer of its own, which the vocab_extension plugin needs to tell the "
            "new tokens from the old and to initialise their embeddings",
            "save the base tokenizer next to the model",
        ) from exc


def check_extends(base: Any, tokenizer: Any, where: str) -> None:
    """Every token of ``base`` must have the same id in ``tokenizer``."""
    extended = tokenizer.get_vocab()
    moved = [(t, i, extended.get(t)) for t, i in base.get_vocab().items() if extended.get(t) != i]
    if moved:
        token, old, new = moved[0]
        raise LmflowError(
            f"--tokenizer {where} does not extend the model's tokenizer: {len(moved):,} of its tokens have other "
            f"ids there (e.g. {token!r}: {old} -> {new})",
            "pass a tokenizer written by `lmflow vocab extend --base <the model's tokenizer>`",
        )


@hookimpl
def prepare_model(config: RunConfig, model: Any, tokenizer: Any) -> None:
    """Grow the embeddings and LM head, initialise the new rows, and freeze all else if asked."""
    base = model_tokenizer(config)
    first_new, total = len(base), len(tokenizer)
    if total <= first_new:
        return
    rows_before = model.get_input_embeddings().weight.shape[0]
    fallback = resize_and_initialise(model, base, tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    note(
        f"vocabulary extension: {total - first_new:,} new tokens; embeddings {rows_before:,} -> {rows:,} rows, "
        "new rows start as the mean of their pieces' embeddings under the model's tokenizer"
        + (f" ({fallback:,} without pieces start as the mean of all rows)" if fallback else "")
    )
    if config.options_for(NAME).train_new_embeddings_only:
        train_rows_only(model, first_new, total, keep_exact=config.weight_decay > 0)
        note(
            f"--train-new-embeddings-only: only embedding and LM head rows {first_new:,}-{total - 1:,} train"
        )


@hookimpl
def on_step(config: RunConfig, step: StepContext) -> None:
    """Put the frozen rows back after weight decay shrank them (``--train-new-embeddings-only``)."""
    import torch

    model = step.model
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    first, end, kept = getattr(model, "lmflow_kept_rows", (0, 0, []))
    with torch.no_grad():
        for weight, head, tail in kept:
            weight[:first].copy_(head)
            weight[end:].copy_(tail)
