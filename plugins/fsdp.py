"""PyTorch FSDP (plugin ``fsdp``): parameters, gradients and optimizer state sharded across processes.

    lmflow run --nproc 4 --plugins fsdp [--fsdp-offload] ...

Runs FSDP2 (``fully_shard``) through the Trainer and accelerate: every decoder layer (the model's
``_no_split_modules``) becomes one shard unit. ``--gradient-checkpointing`` is handed to FSDP's own activation
checkpointing, which avoids an extra all-gather in the backward pass. At the end the full state dict is
gathered and saved as an ordinary model directory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmflow_core import LmflowError, PluginOption, hookimpl

if TYPE_CHECKING:
    from lmflow_core import RunConfig, StepContext

NAME = "fsdp"


@hookimpl
def declare_options() -> list[PluginOption]:
    return [
        PluginOption("offload", bool, False, "Keep sharded parameters and optimizer state in CPU memory."),
        PluginOption(
            "reshard_after_forward",
            bool,
            True,
            "Free gathered parameters after each layer's forward pass (less memory, one more all-gather).",
        ),
    ]


@hookimpl
def declare_conflicts() -> dict[str, str]:
    return {
        "lisa": (
            "FSDP flattens and shards parameters once, for those trainable when training starts, so LISA's "
            "layer switching cannot take effect; run LISA with plain data parallelism (--nproc)"
        ),
    }


@hookimpl
def validate_config(config: RunConfig) -> list[str]:
    import torch

    if config.options_for(NAME).offload and not torch.cuda.is_available():
        return [
            "--fsdp-offload moves shards from the GPU to CPU memory, and this machine has no GPU (the shards are "
            "in CPU memory already); drop --fsdp-offload"
        ]
    return []


@hookimpl
def adjust_training_args(config: RunConfig, training_args: dict[str, Any]) -> None:
    options = config.options_for(NAME)
    fsdp_config: dict[str, Any] = {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one unit per decoder layer (_no_split_modules)
        "reshard_after_forward": options.reshard_after_forward,
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": False,
    }
    if options.offload:
        fsdp_config["cpu_offload"] = True
    for key in ("activation_checkpointing", "gradient_checkpointing"):
        if training_args.get(key):
            training_args[key] = False
            training_args.pop(f"{key}_kwargs", None)
            fsdp_config["activation_checkpointing"] = True
    training_args["fsdp"] = True
    training_args["fsdp_config"] = fsdp_config
    _gloo_state_without_gpus(training_args)


def _gloo_state_without_gpus(training_args: dict[str, Any]) -> None:
    """Let FSDP2 run over gloo on a machine without GPUs (tests, CPU clusters).

    accelerate sets up several CPU processes as ``MULTI_CPU`` and turns on FSDP only for GPU-type process
    groups, so without this the Trainer would silently fall back to DDP. FSDP2 itself shards CPU tensors over
    gloo, so the process group is created here and labelled as a GPU-type group; accelerate then takes its FSDP
    path (the device stays the CPU) and the Trainer uses that state. :func:`on_step` checks on the first step
    that the model really is sharded.
    """
    import os

    import torch

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True, backend="gloo")
    state.distributed_type = DistributedType.MULTI_GPU
    training_args["use_cpu"] = True
    training_args["accelerator_config"] = {"use_configured_state": True}


@hookimpl
def on_step(config: RunConfig, step: StepContext) -> None:
    """Fail loudly, on the first step, if the engine fell back to another kind of parallelism."""
    import os

    if step.global_step != 1 or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    from torch.distributed.tensor import DTensor

    if not isinstance(next(step.model.parameters()), DTensor):
        raise LmflowError(
            "the fsdp plugin is active but the model is not sharded (this accelerate version did not enable FSDP)",
            "run without --plugins fsdp (plain DDP), or use --plugins zero3",
        )
