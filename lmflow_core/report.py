"""What a run prints: a header, data and model facts, a progress bar with the loss log, and a summary.

Only the main process prints. The loss log goes to stdout one line per logging step, so it reads the same in a
terminal, a pipe or a CI log; in a terminal a progress bar runs below it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import TrainerCallback


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``"1m15s"``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_count(n: float) -> str:
    """``3456789`` -> ``"3.5M"``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


_active: ContextVar[Reporter | None] = ContextVar("lmflow_reporter", default=None)


def note(text: str) -> None:
    """Tell the user something in one line (``note: ...``): what a plugin uses for a fallback or advice.

    During a run the line goes through the run's :class:`Reporter` (printed once, by the main process, above
    the progress bar); outside a run the main process prints it to stdout.
    """
    reporter = _active.get()
    if reporter is None:
        reporter = Reporter(main=int(os.environ.get("RANK", "0")) == 0)
    reporter.note(text)


@contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Make ``reporter`` the one :func:`note` prints through inside the block (e.g. one writing to stderr,
    where stdout is kept for JSON), and restore the previous one after it."""
    token = _active.set(reporter)
    try:
        yield reporter
    finally:
        _active.reset(token)


class Reporter:
    """Prints a run's progress. Subclass or pass ``main=False`` to silence it."""

    def __init__(self, main: bool = True, stream: Any = None):
        self.main = main
        self.stream = stream or sys.stdout
        self._bar: Any = None

    def line(self, text: str) -> None:
        if not self.main:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        self.line(f"note: {text}")

    def activate(self) -> Reporter:
        """Make this the reporter that :func:`note` prints through (a run does this as it starts)."""
        _active.set(self)
        return self

    def header(
        self, config: Any, run_plugins: Any, model: str, template: str | None, block_size: int
    ) -> None:
        from .version import __version__

        plugins = ", ".join(f"{p['name']} {p['version']}" for p in run_plugins.versions()) or "none"
        source = (
            "bundled demo (seeded initial weights)"
            if config.is_demo
            else model + (" (random init)" if config.random_init else "")
        )
        self.line(
            f"lmflow {__version__} | model: {source} | template: {template or 'none'} | plugins: {plugins}"
        )
        self.line(f"output: {config.output_dir} | block size: {block_size} | seed: {config.seed}")

    def data(self, split: str, raw: Any, stats: Any) -> None:
        converted = "".join(f", {n} converted from {k}" for k, n in stats.converted.items())
        parts = [
            f"data ({split}): {stats.records:,} {stats.type} records{converted} -> {stats.examples:,} "
            + ("pairs" if stats.type.startswith("paired") else "examples"),
            f"{stats.tokens:,} tokens ({stats.trained_tokens:,} trained)",
        ]
        if stats.truncated:
            parts.append(f"{stats.truncated:,} truncated to {stats.block_size} tokens")
        if stats.dropped_untrained:
            parts.append(f"{stats.dropped_untrained:,} dropped: no trained token left after truncation")
        if stats.cached:
            parts.append("from cache")
        else:
            parts.append(preparation_summary(stats, raw))
        self.line(" | ".join(parts))
        if getattr(raw, "hub", None):
            self.line(f"data ({split}) read from the {raw.hub_description}")
        if stats.truncated:
            # Every example longer than the block size is in `truncated`, the ones that the cut left without a
            # trained token (also counted in `dropped_untrained`) included: adding the two counts them twice.
            many = stats.truncated != 1
            self.note(
                f"{stats.truncated:,} {split} example{'s are' if many else ' is'} longer than --block-size "
                f"{stats.block_size}; raise it to keep {'them' if many else 'it'} whole "
                "(`lmflow data check` shows the lengths)"
            )

    def model(self, model: Any) -> None:
        # ds_numel: the full size of a parameter that DeepSpeed ZeRO-3 has partitioned across processes.
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        dtype = next(model.parameters()).dtype
        self.line(
            f"model: {type(model).__name__}, {format_count(total)} parameters ({format_count(trainable)} "
            f"trainable), {str(dtype).replace('torch.', '')}, {model.device}"
        )

    def progress_callback(self, metric_names: set[str] | None = None) -> TrainerCallback:
        """The trainer callback printing the loss log; ``metric_names``: plugin metrics printed beside it."""
        from .progress import ProgressReporter  # a Trainer callback: transformers loads only for a run

        return ProgressReporter(self, metric_names)

    def summary(self, result: Any) -> None:
        losses = [loss for _, loss in result.losses]
        trend = f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
        self.line(
            f"done: {result.global_step} steps ({result.epochs:g} epoch{'' if result.epochs == 1 else 's'}) in {format_duration(result.train_seconds)}, "
            f"{result.tokens_per_second:,.0f} tokens/s{trend}"
        )
        if result.eval_metrics:
            metrics = ", ".join(
                f"{k} {v:.4f}" for k, v in result.eval_metrics.items() if not k.startswith("eval_")
            )
            # The evaluation dataset's examples; metrics a plugin measured on data of its own come without.
            count = result.eval_metrics.get("eval_samples")
            self.line(f"eval ({int(count)} examples): {metrics}" if count is not None else f"eval: {metrics}")
        for prompt, reply in result.samples:
            self.line(f"sample: {prompt!r} -> {reply!r}")
        from .models import is_adapter

        if is_adapter(result.output_dir):
            how = "a PEFT adapter: peft.PeftModel.from_pretrained, lmflow chat/generate/evaluate"
        else:
            how = f"loads with {auto_class_of(result.output_dir)}.from_pretrained"
        self.line(f"saved: {result.output_dir} ({how})")


def preparation_summary(stats: Any, raw: Any = None) -> str:
    """``read in 2.0s (48 MB/s), tokenized in 9.8s (20,400 records/s, 2 processes)``: the reading (with
    validation) of ``raw``, when it was read rather than taken from the cache, and the tokenization."""
    rate = stats.records / stats.seconds if stats.seconds > 0 else 0.0
    processes = f", {stats.workers} processes" if stats.workers > 1 else ""
    tokenized = f"tokenized in {stats.seconds:.1f}s ({rate:,.0f} records/s{processes})"
    seconds = getattr(raw, "seconds", 0.0)
    if raw is None or getattr(raw, "cached", False) or not seconds:
        return (
            tokenized
            if raw is None or not getattr(raw, "cached", False)
            else f"records from cache, {tokenized}"
        )
    size = getattr(raw, "bytes", None)
    speed = f"{size / seconds / 2**20:,.0f} MB/s" if size else f"{len(raw) / seconds:,.0f} records/s"
    return f"read in {seconds:.1f}s ({speed}), {tokenized}"


def auto_class_of(model_dir: str) -> str:
    """The ``transformers`` auto class that loads a saved model, from its architecture's name."""
    import json
    from pathlib import Path

    try:
        architecture = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "AutoModelForCausalLM"
    if str(architecture).endswith("ForSequenceClassification"):  # a reward model
        return "AutoModelForSequenceClassification"
    if str(architecture).endswith("ForConditionalGeneration"):  # a vision-language model (LLaVA, Qwen2-VL)
        return "AutoModelForImageTextToText"
    return "AutoModelForCausalLM"


def quiet_libraries() -> None:
    """Silence what transformers, datasets, torch and DeepSpeed print that is not the user's to act on (info
    logs, their own progress bars, deprecation notices): a command that loads a model calls this first."""
    import datasets
    import transformers

    from .models import accelerator_available

    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    # Deprecation notices torch's collectives print at every step under DeepSpeed/FSDP: not the user's to fix.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    # peft asks transformers 5 for a renamed attribute when it loads an adapter: not the user's to fix either.
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not accelerator_available():
        # DeepSpeed (imported by the Trainer when installed) would warn that it found no GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
