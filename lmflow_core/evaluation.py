"""Scoring a model on a dataset through the ``evaluate`` hook (``lmflow evaluate`` and the end of a run)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .errors import LmflowError
from .plugins import RunPlugins, call_each


def evaluate_hooks(
    run_plugins: RunPlugins, config: Any, model: Any, tokenizer: Any, dataset: Any
) -> dict[str, float]:
    """Every plugin's metrics merged (the core's NLL included); a metric reported twice is an error."""
    metrics: dict[str, float] = {}
    owners: dict[str, str] = {}
    for plugin, found in call_each(
        run_plugins.hook.evaluate, config=config, model=model, tokenizer=tokenizer, dataset=dataset
    ):
        for key, value in (found or {}).items():
            if key in metrics:
                raise LmflowError(
                    f"plugins '{owners[key]}' and '{plugin}' both report the metric '{key}'",
                    "rename the metric in one of them",
                )
            metrics[key], owners[key] = float(value), plugin
    return metrics


def evaluate_dataset(
    session: Any,
    dataset: str,
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Score ``session``'s model on the dataset at ``dataset``; returns the report.

    Every example is scored whole (longer ones with a sliding window of ``window`` tokens, default the
    model's context); on conversation data only the assistant tokens are scored, as the template marks them.
    """
    from .data import load_raw_dataset, tokenize_dataset

    hook = session.plugins.hook
    template = session.template

    def normalize(record: Any, declared_type: str | None, where: str) -> Any:
        return hook.normalize_record(
            config=session.config, record=record, declared_type=declared_type, where=where
        )

    raw = load_raw_dataset(dataset, template, max_samples, normalize)
    if raw.type == "conversation" and template is None:
        raise LmflowError(
            f"{raw.files[0]} holds conversations but the model has no template",
            "pass --template NAME (see `lmflow templates list`)",
        )
    window = window or session.context or 1024
    if session.context and window > session.context:
        raise LmflowError(
            f"--window {window} exceeds the model's context of {session.context} tokens",
            f"use --window {session.context} or less",
        )

    def render(template: Any, conversation: Any) -> Any:
        return hook.format_conversation(
            config=session.config,
            template=template,
            conversation=conversation,
            add_generation_prompt=False,
            tokenizer=session.tokenizer,
        )

    data, stats = tokenize_dataset(
        raw, session.tokenizer, window, template, render, use_cache=False, truncate=False
    )
    config = session.config
    config.block_size, config.eval_stride, config.eval_batch_size = window, stride, batch_size
    started = time.monotonic()
    metrics = evaluate_hooks(session.plugins, config, session.model, session.tokenizer, data)
    return {
        "model": config.model,
        "dataset": str(dataset),
        "type": raw.type,
        "template": session.template_name if raw.type == "conversation" else None,
        "records": stats.records,
        "examples_longer_than_window": sum(1 for n in data["input_ids"] if len(n) > window),
        "window": window,
        "stride": stride or max(1, window // 2),
        "seconds": round(time.monotonic() - started, 3),
        "metrics": metrics,
    }


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write the report as JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
