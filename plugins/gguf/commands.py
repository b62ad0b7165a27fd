"""``lmflow export gguf``: the command line of ``export_gguf``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .export import OUTTYPES, export_gguf

if TYPE_CHECKING:
    import click


def add_commands(cli: click.Group) -> None:
    """Add the ``export`` group (if no other plugin has) and ``lmflow export gguf`` to ``cli``."""
    import click

    group = cli.commands.get("export")
    if not isinstance(group, click.Group):

        @cli.group("export")
        def group() -> None:
            """Write a trained model in another program's format."""

    @group.command("gguf")
    @click.argument("model")
    @click.option("--output", required=True, help="The .gguf file to write.")
    @click.option(
        "--outtype",
        type=click.Choice(OUTTYPES),
        default="f16",
        show_default=True,
        help="Type of the weight matrices; norms and 1-D tensors stay f32.",
    )
    @click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
    @click.option(
        "--base", help="For a LoRA adapter: the base model to merge into (default: the one it names)."
    )
    @click.option(
        "--trust-remote-code", is_flag=True, help="Allow model code from the hub repository to run."
    )
    @click.option(
        "--plugins",
        default="",
        help="Comma-separated plugins whose loading hooks load the model (with their default options).",
    )
    def export_gguf_command(
        model: str,
        output: str,
        outtype: str,
        overwrite: bool,
        base: str | None,
        trust_remote_code: bool,
        plugins: str,
    ) -> None:
        """Write MODEL (a model directory, hub id or LoRA adapter directory) as one GGUF file for llama.cpp.

        A LoRA adapter is merged into its base first. Supported: Llama, Mistral and Qwen2 models.
        """
        report = export_gguf(
            model,
            output,
            outtype=outtype,
            overwrite=overwrite,
            base=base,
            trust_remote_code=trust_remote_code,
            plugins=[name.strip() for name in plugins.split(",") if name.strip()],
        )
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(report.types.items()))
        click.echo(
            f"wrote {report.path}: {report.architecture}, {report.outtype}, {report.tensors} tensors ({kinds}), "
            f"{report.bytes:,} bytes"
        )
