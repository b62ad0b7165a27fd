"""``lmflow vocab extend``: the command line of ``extend_vocabulary``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmflow_core import quiet_libraries

from .extend import extend_vocabulary

if TYPE_CHECKING:
    import click


def add_commands(cli: click.Group) -> None:
    """Add the ``vocab`` group and ``lmflow vocab extend`` to ``cli``."""
    import click

    @cli.group("vocab")
    def vocab_group() -> None:
        """Extend a tokenizer's vocabulary for a new language or domain."""

    @vocab_group.command("extend")
    @click.option(
        "--corpus",
        "corpus",
        required=True,
        multiple=True,
        help="UTF-8 text file or directory of them to learn pieces from; repeatable, or comma-separated.",
    )
    @click.option(
        "--base",
        required=True,
        help="Tokenizer to extend: a directory with tokenizer.model (SentencePiece) or a byte-level BPE "
        "tokenizer.json, a tokenizer.model file, or a hub id.",
    )
    @click.option(
        "--vocab-size",
        required=True,
        type=click.IntRange(min=1),
        help="Pieces of the SentencePiece model trained on the corpus; those the base lacks are added.",
    )
    @click.option("--output", required=True, help="Directory to write the extended tokenizer to.")
    @click.option("--overwrite", is_flag=True, help="Replace --output if it already holds something.")
    def vocab_extend(
        corpus: tuple[str, ...], base: str, vocab_size: int, output: str, overwrite: bool
    ) -> None:
        """Train a SentencePiece model on the corpus and append its new pieces to a tokenizer.

        Every old token keeps its id, and any text decodes as before. The report (pieces added, tokens per
        character of the corpus before and after) is printed and written to vocab_extension.json.
        """
        quiet_libraries()
        paths = [p for value in corpus for p in value.split(",") if p]
        report = extend_vocabulary(paths, base, vocab_size, output, overwrite=overwrite)
        for line in report.summary():
            click.echo(line)
