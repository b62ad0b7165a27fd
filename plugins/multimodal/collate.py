"""Batches of image conversations: padded token ids and labels, and the pixel inputs of their images."""

from __future__ import annotations

import time
from typing import Any

from .vision import Vision, open_image

TOKEN_COLUMNS = ("input_ids", "labels", "attention_mask")


class ImageCollator:
    """Pads ``input_ids`` (pad token), ``labels`` (-100) and ``attention_mask`` to the longest row, loads each
    row's images (the ``images`` column, in order) and adds the model's pixel inputs.

    ``image_seconds`` adds up the time spent reading and processing images (the benchmark reports its share).
    """

    def __init__(self, vision: Vision, pad_token_id: int):
        self.vision = vision
        self.pad_token_id = pad_token_id
        self.image_seconds = 0.0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        pads = {"input_ids": self.pad_token_id, "labels": -100, "attention_mask": 0}
        batch = {
            key: torch.tensor([list(f[key]) + [pad] * (longest - len(f[key])) for f in features])
            for key, pad in pads.items()
        }
        started = time.perf_counter()
        images = [open_image(source) for f in features for source in f.get("images") or ()]
        batch.update(self.vision.pixel_inputs(images))
        self.image_seconds += time.perf_counter() - started
        batch.update(self.vision.token_type_ids(batch["input_ids"]))
        return batch
