"""What a run prints: a header, data and model facts, a progress bar with the loss log, and a summary.

Only the main process prints. The loss log goes to stdout one line per logging step, so it reads the same in a
terminal, a pipe or a CI log; in a terminal a progress bar runs below it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

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
        from . import __version__

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
            f"data ({split}): {stats.records:,} {stats.type} records{converted} -> {stats.examples:,} examples",
            f"{stats.tokens:,} tokens ({stats.trained_tokens:,} trained)",
        ]
        if stats.truncated:
            parts.append(f"{stats.truncated:,} truncated to {stats.block_size} tokens")
        if stats.dropped_untrained:
            parts.append(f"{stats.dropped_untrained:,} dropped: no trained token left after truncation")
        if stats.cached:
            parts.append("from cache")
        self.line(" | ".join(parts))
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

    def progress_callback(self) -> TrainerCallback:
        return ProgressReporter(self)

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
            count = int(result.eval_metrics.get("eval_samples", 0))
            self.line(f"eval ({count} examples): {metrics}")
        for prompt, reply in result.samples:
            self.line(f"sample: {prompt!r} -> {reply!r}")
        from .models import is_adapter

        if is_adapter(result.output_dir):
            how = "a PEFT adapter: peft.PeftModel.from_pretrained, lmflow chat/generate/evaluate"
        else:
            how = "loads with AutoModelForCausalLM.from_pretrained"
        self.line(f"saved: {result.output_dir} ({how})")


class ProgressReporter(TrainerCallback):
    """The loss log (one line per logging step) and, in a terminal, a progress bar."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter
        self.start = 0.0
        self.last_time = 0.0
        self.last_tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        r = self.reporter
        self.start = self.last_time = time.monotonic()
        self.last_tokens = state.num_input_tokens_seen
        world = args.world_size
        r.line(
            f"training: {state.max_steps} steps | batch {args.per_device_train_batch_size} x "
            f"{args.gradient_accumulation_steps} accumulation x {world} process{'es' if world > 1 else ''} | "
            f"lr {args.learning_rate:g} {args.lr_scheduler_type.value if hasattr(args.lr_scheduler_type, 'value') else args.lr_scheduler_type}"
            + (f" | resuming at step {state.global_step}" if state.global_step else "")
        )
        if r.main and r.stream.isatty():
            from tqdm.auto import tqdm

            r._bar = tqdm(
                total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True, leave=False
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.reporter._bar is not None:
            self.reporter._bar.update(state.global_step - self.reporter._bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not logs:
            return
        now = time.monotonic()
        width = len(str(state.max_steps))
        if "loss" in logs:
            tokens = state.num_input_tokens_seen - self.last_tokens
            rate = tokens / (now - self.last_time) if now > self.last_time else 0.0
            self.last_time, self.last_tokens = now, state.num_input_tokens_seen
            parts = [f"step {state.global_step:>{width}}/{state.max_steps}", f"loss {logs['loss']:.4f}"]
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.2e}")
            if "grad_norm" in logs:
                parts.append(f"grad {logs['grad_norm']:.3g}")
            if rate:
                parts.append(f"{rate:,.0f} tok/s")
            self.reporter.line(" | ".join(parts))
            if self.reporter._bar is not None:
                self.reporter._bar.set_postfix(loss=f"{logs['loss']:.4f}")
        elif "eval_loss" in logs:
            self.reporter.line(
                f"step {state.global_step:>{width}}/{state.max_steps} | eval loss {logs['eval_loss']:.4f}"
            )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.reporter._bar is not None:
            self.reporter._bar.close()
            self.reporter._bar = None
