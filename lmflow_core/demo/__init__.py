"""The embedded default: a tiny Llama-style model config, its tokenizer and a small conversation dataset.

``lmflow run`` with neither ``--model`` nor ``--dataset`` fine-tunes this demo with the settings in
:func:`demo_settings`; any of them can still be overridden by flags. Its starting weights are a seeded random
initialisation, saved once as a normal model directory (:func:`demo_base_dir`), so that everything that needs a
base model (a LoRA adapter, merge-lora, generate/chat/serve on the adapter) finds one. Assets are rebuilt with
``python -m lmflow_core.demo.build``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
_ASSETS = ("config.json", "tokenizer.json", "tokenizer_config.json")
_BASE_NAME = re.compile(r"base-seed(\d+)-([0-9a-f]{12})")


def demo_model_dir() -> Path:
    """Directory with the demo model's ``config.json`` and tokenizer (no weights: initialised at run time)."""
    return HERE / "model"


def lmflow_home() -> Path:
    """lmflow's cache directory: ``$LMFLOW_CACHE``, default ``~/.cache/lmflow``."""
    return Path(os.environ.get("LMFLOW_CACHE") or Path.home() / ".cache" / "lmflow")


@functools.cache  # model_source asks several times a run; the assets and versions do not change meanwhile
def _fingerprint(seed: int) -> str:
    import torch
    import transformers

    digest = hashlib.sha256(f"seed={seed} torch={torch.__version__} tf={transformers.__version__}".encode())
    for name in _ASSETS:
        digest.update((demo_model_dir() / name).read_bytes())
    return digest.hexdigest()[:12]


def demo_base_dir(seed: int = 42) -> Path:
    """The demo model with its seeded initial weights, as a directory ``from_pretrained`` loads.

    Built on first use under ``$LMFLOW_CACHE/demo`` (about 6 MB, a second), named after the seed and a hash of
    the demo assets and library versions, so a change to any of them builds a new one. The weights are those
    ``set_seed(seed)`` + ``from_config`` give, i.e. what a random initialisation of the demo gives in a run.
    """
    target = lmflow_home() / "demo" / f"base-seed{seed}-{_fingerprint(seed)}"
    if not (target / "model.safetensors").is_file():
        _build_base(target, seed)
    return target


def rebuild_demo_base(path: str | os.PathLike) -> bool:
    """Rebuild a missing demo base at ``path`` if it names the current demo (an adapter trained on the demo
    whose cache was cleared); return whether ``path`` is such a directory now."""
    path = Path(path)
    match = _BASE_NAME.fullmatch(path.name)
    if path.exists() or match is None or path.parent.name != "demo":
        return False
    seed = int(match.group(1))
    if match.group(2) != _fingerprint(seed):
        return False
    _build_base(path, seed)
    return True


def _build_base(target: Path, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{target.name}-", dir=target.parent))
    try:
        set_seed(seed)
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(demo_model_dir()), dtype=torch.float32
        )
        model.save_pretrained(staging)
        for name in _ASSETS[1:]:
            shutil.copy(demo_model_dir() / name, staging / name)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # not another process's finished build
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def demo_dataset(split: str = "train") -> Path:
    """The bundled conversation dataset (``train`` or ``eval``)."""
    return HERE / "data" / f"{split}.json"


def demo_settings(plugins: list[str] = (), given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run settings used when neither a model nor a dataset is given (the lowest-precedence layer).

    ``plugins`` are the plugins the run uses and ``given`` what the user set: a plugin that needs an option
    to do anything gets a demo value for it unless the user gave its options (``--plugins rope_scaling``
    alone doubles the demo's context).
    """
    given = given or {}
    extra: dict[str, Any] = {}
    if "rope_scaling" in plugins and not given.get("rope_scaling"):
        extra["rope_scaling"] = {"target_context": 1024}
    return {
        **extra,
        "dataset": str(demo_dataset("train")),
        "eval_dataset": str(demo_dataset("eval")),
        "template": "chatml",
        "epochs": 6,
        "learning_rate": 3e-3,
        "lr_scheduler": "cosine",
        "warmup": 0.05,
        "batch_size": 16,
        "group_by_length": True,
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
