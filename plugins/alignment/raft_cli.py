"""``lmflow raft``: the command line of :func:`lmflow_plugins.alignment.raft.raft`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import click


def add_command(cli: click.Group) -> None:
    """Add ``lmflow raft`` to ``cli``."""
    import click

    from .raft import STRATEGIES

    @cli.command("raft")
    @click.option("--model", required=True, help="Model to start from: a model directory or hub id.")
    @click.option(
        "--prompts",
        required=True,
        help='Prompts: a .json list or .jsonl file of {"prompt": ...} or {"messages": [...]} records.',
    )
    @click.option(
        "--reward",
        required=True,
        help="A reward model directory, or a function module:function or path/to/file.py:function "
        "taking (prompts, answers) lists and returning one float per answer.",
    )
    @click.option("--output", required=True, help="Directory for the iterations and raft.json.")
    @click.option(
        "--iterations", type=int, default=3, show_default=True, help="Rounds of sample, score, train."
    )
    @click.option(
        "--samples-per-prompt",
        "-k",
        type=int,
        default=4,
        show_default=True,
        help="Answers sampled per prompt (K).",
    )
    @click.option(
        "--strategy",
        type=click.Choice(STRATEGIES),
        default="per-prompt",
        show_default=True,
        help="per-prompt: keep the best answer of each prompt; global: the --top-fraction best of all samples.",
    )
    @click.option(
        "--top-fraction",
        type=float,
        default=0.25,
        show_default=True,
        help="Share of all samples --strategy global keeps, in (0, 1].",
    )
    @click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature.")
    @click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling threshold.")
    @click.option(
        "--max-new-tokens", type=int, default=128, show_default=True, help="Longest answer in tokens."
    )
    @click.option(
        "--seed", type=int, default=42, show_default=True, help="Seed of the sampling and training."
    )
    @click.option(
        "--learning-rate", type=float, help="Training peak learning rate (default: lmflow run's, 2e-5)."
    )
    @click.option("--epochs", type=float, help="Passes over the kept answers (default: lmflow run's, 3).")
    @click.option("--max-steps", type=int, help="Optimizer steps per iteration (overrides --epochs).")
    @click.option("--batch-size", type=int, help="Training examples per step (default: lmflow run's, 8).")
    @click.option("--template", help="Conversation template (default: stored with the model).")
    @click.option("--plugins", help="Training plugins, comma-separated (e.g. lora).")
    @click.option(
        "--train-config",
        type=click.Path(dir_okay=False),
        help="A YAML file of more `lmflow run` settings for the training (the flags given above win).",
    )
    @click.option(
        "--device", default="auto", show_default=True, help="Sampling and reward model: auto, cpu, cuda..."
    )
    @click.option(
        "--dtype",
        type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
        default="auto",
        show_default=True,
        help="Dtype of the model while it samples (auto: bfloat16 on a GPU that has it, else float32); a "
        "reward model scores in float32 unless another is named.",
    )
    @click.option(
        "--resume", is_flag=True, help="Continue the RAFT run in --output after its last finished iteration."
    )
    @click.option(
        "--overwrite", is_flag=True, help="Replace the RAFT run in --output (only what RAFT wrote)."
    )
    def raft_command(plugins: str | None, output: str, **values: Any) -> None:
        """Reward-ranked fine-tuning (RAFT): sample answers, keep the best by a reward, fine-tune, repeat.

        Each iteration samples --samples-per-prompt answers to every prompt from the current model, scores them
        with --reward, keeps the best (--strategy) and fine-tunes the model on them as `lmflow run` does; the
        trained model answers in the next iteration. Writes OUTPUT/iteration-N/ (rewards.jsonl, train.jsonl,
        model/) and OUTPUT/raft.json; a killed run continues with --resume.
        """
        from .raft import SUMMARY, raft

        result = raft(
            output_dir=output,
            plugins=None
            if plugins is None
            else [name.strip() for name in plugins.split(",") if name.strip()],
            log=click.echo,
            **values,
        )
        rewards = ", ".join(f"{value:.4g}" for value in result.mean_rewards)
        click.echo(f"mean reward per iteration: {rewards}")
        click.echo(f"model: {result.model} | summary: {result.output_dir / SUMMARY}")
