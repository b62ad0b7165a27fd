"""FlashAttention-2 where the machine can run it, PyTorch SDPA elsewhere (plugin ``flash_attn``).

    lmflow run --plugins flash_attn --bf16 --packing ...

FlashAttention-2 (Dao, arXiv 2307.08691) needs the ``flash-attn`` package (2.3.3 or newer, what transformers
accepts), a CUDA GPU of compute capability 8.0 or higher (Ampere and later) and 16-bit compute (``--bf16``,
``--fp16``, or ``--model-dtype bfloat16``/``float16``). When one of them is missing the run says which, in one
line, and uses PyTorch's scaled-dot-product attention (SDPA) instead. The choice reaches the model as
``attn_implementation`` (the ``model_init_kwargs`` hook) and is saved in its config. With ``--packing`` the
collator passes the packed examples' boundaries, so FlashAttention-2 attends within each example only; it
composes with ``--gradient-checkpointing`` as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmflow_core import hookimpl, note

if TYPE_CHECKING:
    from lmflow_core import RunConfig

NAME = "flash_attn"
FLASH = "flash_attention_2"
SDPA = "sdpa"
MIN_VERSION = "2.3.3"
MIN_CAPABILITY = (8, 0)
HALF_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class Machine:
    """What FlashAttention-2 depends on: the installed flash-attn version and the GPU's compute capability."""

    flash_attn_version: str | None
    cuda_capability: tuple[int, int] | None


def detect_machine() -> Machine:
    """Read the flash-attn package version (``None``: not installed) and the current CUDA GPU's capability."""
    from importlib import metadata

    import torch

    try:
        version: str | None = metadata.version("flash-attn")
    except metadata.PackageNotFoundError:
        version = None
    capability = tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
    return Machine(version, capability)  # type: ignore[arg-type]


def computes_in_half_precision(config: RunConfig) -> bool:
    """True when attention runs in bfloat16/float16: mixed precision, or 16-bit weights."""
    return bool(config.bf16 or config.fp16 or config.model_dtype in HALF_DTYPES)


def choose_attention(config: RunConfig, machine: Machine | None = None) -> tuple[str, str]:
    """The attention implementation for a run, and a one-line note saying what was chosen and why.

    Returns ``("flash_attention_2", note)`` when flash-attn is installed, the GPU has compute capability 8.0
    or more and the run computes in 16 bits; otherwise ``("sdpa", note naming the first missing condition)``.
    """
    machine = machine or detect_machine()
    reason = _missing(config, machine)
    if reason:
        return SDPA, f"{NAME}: {reason}; using PyTorch SDPA"
    return FLASH, f"{NAME}: using FlashAttention-2 (flash-attn {machine.flash_attn_version})"


def _missing(config: RunConfig, machine: Machine) -> str | None:
    """The first condition of FlashAttention-2 that this run does not meet, or ``None``."""
    from packaging.version import InvalidVersion, Version

    version = machine.flash_attn_version
    if version is None:
        return "the flash-attn package is not installed"
    try:
        too_old = Version(version) < Version(MIN_VERSION)
    except InvalidVersion:
        too_old = True
    if too_old:
        return f"flash-attn {version} is older than {MIN_VERSION}, the oldest transformers uses"
    if machine.cuda_capability is None:
        return "no CUDA GPU"
    if tuple(machine.cuda_capability) < MIN_CAPABILITY:
        major, minor = machine.cuda_capability
        return f"the GPU has compute capability {major}.{minor}; FlashAttention-2 needs 8.0 (Ampere) or newer"
    if not computes_in_half_precision(config):
        return "the run computes in float32; FlashAttention-2 needs --bf16, --fp16 or a 16-bit --model-dtype"
    return None


@hookimpl
def model_init_kwargs(config: RunConfig) -> dict[str, Any]:
    implementation, message = choose_attention(config)
    note(message)
    return {"attn_implementation": implementation}
