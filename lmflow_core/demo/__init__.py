"""The embedded default: a tiny Llama-style model config, its tokenizer and a small conversation dataset.

``lmflow run`` with neither ``--model`` nor ``--dataset`` fine-tunes this demo (from a seeded random
initialisation) with the settings in :func:`demo_settings`; any of them can still be overridden by flags.
Assets are rebuilt with ``python -m lmflow_core.demo.build``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def demo_model_dir() -> Path:
    """Directory with the demo model's ``config.json`` and tokenizer (no weights: initialised at run time)."""
    return HERE / "model"


def demo_dataset(split: str = "train") -> Path:
    """The bundled conversation dataset (``train`` or ``eval``)."""
    return HERE / "data" / f"{split}.json"


def demo_settings() -> dict[str, Any]:
    """Run settings used when neither a model nor a dataset is given (the lowest-precedence layer)."""
    return {
        "dataset": str(demo_dataset("train")),
        "eval_dataset": str(demo_dataset("eval")),
        "template": "chatml",
        "epochs": 6,
        "learning_rate": 3e-3,
        "lr_scheduler": "cosine",
        "warmup": 0.05,
        "batch_size": 16,
        "block_size": 256,
        "logging_steps": 10,
        "save_steps": 150,
        "save_total_limit": 2,
        "sample_prompts": [
            "What is the opposite of hot?",
            "How do you spell tree?",
            "What is the capital of Italy?",
        ],
    }
