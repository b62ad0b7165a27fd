"""The default batch collator: pads examples to the longest of the batch."""

from __future__ import annotations

from typing import Any

MODEL_COLUMNS = ("input_ids", "labels", "attention_mask")


class PaddingCollator:
    """Pads ``input_ids`` with the pad token and ``labels`` with -100; other columns are left to plugins."""

    def __init__(self, tokenizer: Any):
        from transformers import DataCollatorForSeq2Seq

        self.pad = DataCollatorForSeq2Seq(
            tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt"
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.pad([{k: f[k] for k in MODEL_COLUMNS if k in f} for f in features])
