"""The progress of a training run: the loss log and, in a terminal, a progress bar (a Trainer callback).

Kept apart from :mod:`lmflow_core.report` so that printing a note does not load transformers.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from .report import Reporter


class ProgressReporter(TrainerCallback):
    """The loss log (one line per logging step) and, in a terminal, a progress bar."""

    def __init__(self, reporter: Reporter, metric_names: set[str] | None = None):
        self.reporter = reporter
        self.metric_names = metric_names if metric_names is not None else set()
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
            parts += [f"{name} {logs[name]:.4g}" for name in sorted(self.metric_names) if name in logs]
            if rate:
                parts.append(f"{rate:,.0f} tok/s")
            self.reporter.line(" | ".join(parts))
            if self.reporter._bar is not None:
                self.reporter._bar.set_postfix(loss=f"{logs['loss']:.4f}")
        elif "eval_loss" in logs:
            extra = "".join(
                f" | eval {name} {logs['eval_' + name]:.4g}"
                for name in sorted(self.metric_names)
                if "eval_" + name in logs
            )
            self.reporter.line(
                f"step {state.global_step:>{width}}/{state.max_steps} | eval loss {logs['eval_loss']:.4f}{extra}"
            )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.reporter._bar is not None:
            self.reporter._bar.close()
            self.reporter._bar = None
