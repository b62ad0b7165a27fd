"""A run's data: tokenized with the run's template and plugins, plugin-prepared, packed, checked against the model.

Called by :mod:`lmflow_core.train` between loading the tokenizer and loading the model.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..errors import LmflowError
from ..plugins import RunPlugins, fold
from .packing import check_packing_support, pack_dataset
from .prepare import drop_untrained, tokenize_dataset

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..report import Reporter


def prepare_data(
    config: RunConfig,
    run_plugins: RunPlugins,
    tokenizer: Any,
    template: Any,
    block_size: int,
    train_raw: Any,
    eval_raw: Any,
    report: Reporter,
) -> tuple[Any, Any, dict[str, Any]]:
    hook = run_plugins.hook

    def render(template: Any, conversation: Any, add_generation_prompt: bool = False) -> Any:
        return hook.format_conversation(
            config=config,
            template=template,
            conversation=conversation,
            add_generation_prompt=add_generation_prompt,
            tokenizer=tokenizer,
        )

    prepared, stats = {}, {}
    for split, raw in (("train", train_raw), ("eval", eval_raw)):
        if raw is None:
            continue
        data, split_stats = tokenize_dataset(
            raw,
            tokenizer,
            block_size,
            template,
            render,
            config.group_texts,
            cache_extra=formatter_fingerprint(run_plugins),
            workers=config.preprocessing_workers,
        )
        report.data(split, raw, split_stats)
        data = fold(
            hook.prepare_dataset, "dataset", config=config, dataset=data, tokenizer=tokenizer, split=split
        )
        if split_stats.dropped_untrained and len(data) > split_stats.examples:  # kept for the plugins to see
            data = drop_untrained(data)
        if len(data) == 0:
            raise LmflowError(
                f"the {split} dataset has no example left to train on", "check the data and --block-size"
            )
        prepared[split], stats[split] = data, split_stats.to_dict()
        stats[split]["formats"] = dict(raw.formats)
        if raw.hub is not None:  # which commit of a hub dataset was read, for the run record
            stats[split]["hub"] = raw.hub
        if split == "train" and config.packing:
            prepared[split], stats[split]["packing"] = _pack(config, raw, data, block_size, report)
        raw.release()  # tokenized: the records' Python objects are not needed through training
    return prepared["train"], prepared.get("eval"), stats


def check_packing(config: RunConfig, model_config: Any) -> None:
    """Refuse --packing, before anything is loaded, for an architecture that would mix packed examples."""
    if config.packing:
        check_packing_support(model_config)


def _pack(config: RunConfig, raw: Any, data: Any, block_size: int, report: Reporter) -> tuple[Any, Any]:
    """Pack the training examples into rows of ``block_size`` tokens; report and return the packing stats.

    Evaluation data stays unpacked: it is scored example by example. Grouped text_only data fills every block
    already and is left as it is.
    """
    if raw.type == "text_only" and config.group_texts:
        report.note(
            "--packing: text_only data is already grouped into full blocks (--group-texts); pass "
            "--no-group-texts to pack whole texts instead"
        )
        return data, None
    packed, packing = pack_dataset(data, block_size)
    report.line(f"packing (train): {packing.summary()}")
    return packed, packing.to_dict()


def formatter_fingerprint(run_plugins: RunPlugins) -> str:
    """Identifies the plugins that render conversations, for the tokenization cache key.

    An installed plugin is identified by its version; a plugin object passed from Python by a hash of its
    hook function (code and state), so editing it invalidates the cache.
    """
    from datasets.fingerprint import Hasher

    parts = []
    for impl in run_plugins.hook.format_conversation.get_hookimpls():
        info = run_plugins.infos.get(impl.plugin_name)
        try:
            identity = info.version if info else Hasher.hash(impl.function)
        except Exception:  # an object that cannot be hashed: never reuse a cache for it
            identity = os.urandom(8).hex()
        parts.append(f"{impl.plugin_name}={identity}")
    return ",".join(parts)


def check_vocabulary(model: Any, data_stats: dict[str, Any]) -> None:
    """Every token id of the data must have an embedding row (a tokenizer that does not fit the model)."""
    embeddings = model.get_input_embeddings()
    # num_embeddings survives parameter partitioning (ZeRO-3), where the weight itself is empty.
    rows = getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0]
    for split, stats in data_stats.items():
        if stats["max_token_id"] >= rows:
            raise LmflowError(
                f"the {split} data has token id {stats['max_token_id']} but the model's embeddings have only "
                f"{rows} rows",
                "use the model's own tokenizer, or add --plugins vocab_extension to resize the embeddings for it",
            )
