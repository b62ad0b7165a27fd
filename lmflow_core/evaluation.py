"""Scoring a model on a dataset through the ``evaluate`` hook (``lmflow evaluate`` and the end of a run)."""

from __future__ import annotations

import json
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
    # Without evaluation data (a run without --eval-dataset) only the implementations that score data of their
    # own are called: those that do not take ``dataset``. One written for evaluation data never sees None.
    skip = (lambda impl: "dataset" in impl.argnames) if dataset is None else None
    for plugin, found in call_each(
        run_plugins.hook.evaluate, skip=skip, config=config, model=model, tokenizer=tokenizer, dataset=dataset
    ):
        for key, value in (found or {}).items():
            if key in metrics:
                raise LmflowError(
                    f"plugins '{owners[key]}' and '{plugin}' both report the metric '{key}'",
                    "rename the metric in one of them",
                )
            metrics[key], owners[key] = float(value), plugin
    return metrics


def check_evaluation_options(
    nll_definition: str = "training",
    prompt_structure: str | None = None,
    window: int | None = None,
    stride: int | None = None,
) -> str:
    """Refuse inconsistent options before anything loads; returns the NLL definition.

    Raises:
        LmflowError: an unknown definition, a prompt structure without ``lmflow`` or that ``str.format``
            cannot fill with ``input`` alone, or (``training``) a stride not smaller than the window.
    """
    from .nll import check_nll_definition

    definition = check_nll_definition(nll_definition)
    if prompt_structure is not None:
        if definition != "lmflow":
            raise LmflowError(
                "--prompt-structure applies only to LMFlow's definition", "add --nll-definition lmflow"
            )
        try:
            filled = prompt_structure.format(input="\0")
        except (KeyError, IndexError, ValueError) as exc:
            raise LmflowError(
                f"--prompt-structure {prompt_structure!r} cannot be filled in ({type(exc).__name__}: {exc})",
                "write the input as {input} and double other braces: {{ }}",
            ) from None
        if "\0" not in filled:
            raise LmflowError(
                f"--prompt-structure {prompt_structure!r} has no {{input}}",
                "e.g. 'Question: {input} Answer:'",
            )
    if definition == "training" and stride and window and stride >= window:
        raise LmflowError(f"--stride {stride} must be smaller than --window {window}")
    return definition


def lmflow_examples(raw: Any, tokenizer: Any, prompt_structure: str = "{input}") -> Any:
    """``raw`` tokenized as LMFlow's ``HFDecoderModel.tokenize(dataset, add_special_tokens=False)`` does for
    its evaluator: no BOS, no EOS, nothing truncated or dropped.

    A text is scored whole; a text2text record is ``prompt_structure.format(input=...)`` followed by its
    output, each tokenized on its own, and only the output is scored. Returns a ``datasets.Dataset`` of
    ``input_ids``, ``labels`` and ``attention_mask``, one example per record.
    """
    import datasets

    from .data.prepare import IGNORE_INDEX

    if raw.type == "text_only":
        ids = tokenizer([r["text"] for r in raw.records], add_special_tokens=False)["input_ids"]
        labels = [list(x) for x in ids]
    elif raw.type == "text2text":
        prompts = [prompt_structure.format(input=r["input"]) for r in raw.records]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer([r["output"] for r in raw.records], add_special_tokens=False)["input_ids"]
        ids = [p + a for p, a in zip(prompt_ids, answer_ids)]
        labels = [[IGNORE_INDEX] * len(p) + a for p, a in zip(prompt_ids, answer_ids)]
    else:
        raise LmflowError(
            f"LMFlow's NLL is defined for text_only and text2text data, not {raw.type} "
            "(its evaluator refuses other types)",
            "score conversations with --nll-definition training",
        )
    masks = [[1] * len(x) for x in ids]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "attention_mask": masks})


def evaluate_dataset(
    session: Any,
    dataset: str,
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
    nll_definition: str = "training",
    prompt_structure: str | None = None,
    dataset_format: str = "auto",
    dataset_config: str | None = None,
    dataset_revision: str | None = None,
) -> dict[str, Any]:
    """Score ``session``'s model on the dataset at ``dataset``; returns the report.

    Args:
        dataset: a data file, a directory of them, or a hub dataset ``org/name[:split]`` (its validation or
            test split when none is named); read as ``lmflow run`` reads ``--eval-dataset``.
        dataset_format, dataset_config, dataset_revision: as ``lmflow run``'s ``--dataset-format``,
            ``--dataset-config`` and ``--dataset-revision``.
        window: longest context per forward pass; default the model's context (``training``) or LMFlow's
            ``max_length`` (``lmflow``: ``min(n_positions, tokenizer.model_max_length)``, else
            ``min(1024, model_max_length)``).
        stride: how far the window moves over longer examples; default half a window (``training``) or 512
            (``lmflow``, its ``--evaluate_block_size``).
        nll_definition: ``"training"`` (default) scores the examples as training tokenizes them, the EOS
            after each text or answer included; ``"lmflow"`` reproduces LMFlow's ``_evaluate_nll`` (no BOS or
            EOS, LMFlow's windows), for numbers comparable with LMFlow's. See :mod:`lmflow_core.nll`.
        prompt_structure: (``lmflow`` only) LMFlow's ``--prompt_structure``, applied to text2text inputs;
            default ``"{input}"``.

    Every example is scored whole (longer ones with a sliding window); on conversation data (``training``
    only) only the assistant tokens are scored, as the template marks them.
    """
    from .data import load_raw_dataset, tokenize_dataset
    from .nll import LMFLOW_STRIDE, NLL_DEFINITION, lmflow_window

    definition = check_evaluation_options(nll_definition, prompt_structure, window, stride)
    hook = session.plugins.hook
    template = session.template

    def normalize(record: Any, declared_type: str | None, where: str, data_file: Any) -> Any:
        return hook.normalize_record(
            config=session.config,
            record=record,
            declared_type=declared_type,
            where=where,
            data_file=data_file,
        )

    raw = load_raw_dataset(
        dataset,
        template,
        max_samples,
        normalize if hook.normalize_record.get_hookimpls() else None,
        dataset_format=dataset_format,
        dataset_config=dataset_config,
        dataset_revision=dataset_revision,
        purpose="eval",
    )
    if raw.paired:
        raise LmflowError(
            f"{raw.name} holds preference pairs; lmflow evaluate scores the likelihood of texts and conversations",
            "score pairs with `lmflow run --plugins reward_model` or `--plugins dpo` and --eval-dataset (pair "
            "accuracy), or evaluate on the chosen answers as a conversation dataset",
        )
    if raw.uses_template and template is None and definition == "training":
        raise LmflowError(
            f"{raw.name} holds conversations but the model has no template",
            "pass --template NAME (see `lmflow templates list`)",
        )
    context = session.context
    if window and context and window > context:
        raise LmflowError(
            f"--window {window} exceeds the model's context of {context} tokens",
            f"use --window {context} or less",
        )

    if definition == "lmflow":
        data = lmflow_examples(raw, session.tokenizer, prompt_structure or "{input}")
        records = len(raw)
        if window is None:
            window = lmflow_window(session.model.config, session.tokenizer)
            beyond = sum(1 for ids in data["input_ids"] if context and len(ids) > context)
            if context and window > context and beyond:
                raise LmflowError(
                    f"LMFlow reads this model in windows of {window} tokens, more than its context of "
                    f"{context}, and {beyond} example(s) are longer than the context",
                    f"pass --window {context} or less",
                )
        stride = stride or LMFLOW_STRIDE
    else:
        window = window or context or 1024
        stride = stride or max(1, window // 2)

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
        records = stats.records
    config = session.config
    config.block_size, config.eval_stride, config.eval_batch_size = window, stride, batch_size
    config.stash[NLL_DEFINITION] = definition
    started = time.monotonic()
    metrics = evaluate_hooks(session.plugins, config, session.model, session.tokenizer, data)
    return {
        "model": config.model,
        "dataset": str(dataset),
        "hub": raw.hub,
        "type": raw.type,
        "template": session.template_name if raw.uses_template else None,
        "nll_definition": definition,
        "prompt_structure": (prompt_structure or "{input}") if definition == "lmflow" else None,
        "records": records,
        "examples_longer_than_window": sum(1 for n in data["input_ids"] if len(n) > window),
        "window": window,
        "stride": stride,
        "seconds": round(time.monotonic() - started, 3),
        "metrics": metrics,
    }


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write the report as JSON, atomically."""
    from .rundir import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(report, indent=2) + "\n")
