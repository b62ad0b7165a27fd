"""The default batch collator: pads examples to the longest of the batch."""

from __future__ import annotations

from typing import Any

MODEL_COLUMNS = ("input_ids", "labels", "attention_mask")
#: A preference pair's rejected answer (see :mod:`lmflow_core.data.prepare`).
REJECTED = {
    "rejected_input_ids": "input_ids",
    "rejected_labels": "labels",
    "rejected_attention_mask": "attention_mask",
}


class PaddingCollator:
    """Pads ``input_ids`` with the pad token and ``labels`` with -100; other columns are left to plugins.

    A batch of B preference pairs becomes 2B rows padded to one length: the chosen answers, then the rejected
    ones in the same order (one forward pass scores both).
    """

    def __init__(self, tokenizer: Any):
        from transformers import DataCollatorForSeq2Seq

        self.pad = DataCollatorForSeq2Seq(
            tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt"
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [{k: f[k] for k in MODEL_COLUMNS if k in f} for f in features]
        if features and "rejected_input_ids" in features[0]:
            rows += [{new: f[old] for old, new in REJECTED.items() if old in f} for f in features]
        return self.pad(rows)
