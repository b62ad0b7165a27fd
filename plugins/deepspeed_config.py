"""What the ``zero2`` and ``zero3`` plugins share: the DeepSpeed config built from lmflow's own options.

The run's batch size, gradient accumulation, clipping and precision are written into the DeepSpeed config
explicitly, so DeepSpeed and the Trainer can never disagree about them. A user's DeepSpeed JSON
(``--zero3-config ds.json``) is merged over the built config; it may tune everything else (bucket sizes,
offload details, ...), but a value that contradicts the run's own options is an error naming both.
Sizes that depend on the model (``reduce_bucket_size``, ``stage3_prefetch_bucket_size``,
``stage3_param_persistence_threshold``) are left ``"auto"``: transformers fills them from the model's hidden
size when the engine starts.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmflow_core import LmflowError, PluginOption, free_port, hookimpl, read_input_text

if TYPE_CHECKING:
    from lmflow_core import RunConfig

INSTALL_HINT = "install it with: pip install 'lmflow[deepspeed]' (or pip install deepspeed)"


def options(stage: int) -> list[PluginOption]:
    """The options of the ``zero<stage>`` plugin."""
    declared = [
        PluginOption(
            "offload_optimizer", bool, False, "Keep optimizer state (and the optimizer step) in CPU memory."
        ),
    ]
    if stage == 3:
        declared.append(PluginOption("offload_params", bool, False, "Keep the parameters in CPU memory."))
    declared.append(
        PluginOption(
            "config",
            str,
            None,
            "A DeepSpeed JSON merged over the config built from the run's options.",
        )
    )
    return declared


def problems(config: RunConfig, plugin: str, stage: int) -> list[str]:
    """What stops the plugin from running: DeepSpeed missing, an unreadable JSON, contradicting values."""
    found = []
    if importlib.util.find_spec("deepspeed") is None:
        found.append(f"the {plugin} plugin needs DeepSpeed, which is not installed; {INSTALL_HINT}")
    try:
        build(config, plugin, stage)
    except ValueError as exc:
        found.append(str(exc))
    return found


def build(config: RunConfig, plugin: str, stage: int) -> dict[str, Any]:
    """The DeepSpeed config of the run: built from its options, then the user's JSON merged over it."""
    import torch

    opts = config.options_for(plugin)
    pin = torch.cuda.is_available()
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if opts.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                # The final model is gathered into ordinary 16/32-bit weights that from_pretrained loads.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
        if opts.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    built: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_clipping": config.max_grad_norm,
        "bf16": {"enabled": bool(config.bf16)},
        "fp16": {"enabled": bool(config.fp16)},
        "zero_optimization": zero,
        # The global batch: what every process takes per step, times the processes of the launch.
        "train_batch_size": config.batch_size * config.grad_accum * int(os.environ.get("WORLD_SIZE", "1")),
        "steps_per_print": 10**9,  # the run prints its own progress
        "wall_clock_breakdown": False,
    }
    if opts.offload_optimizer:
        # With the optimizer on the CPU, DeepSpeed's own CPU Adam does the step; transformers fills in the
        # run's learning rate, betas, epsilon and weight decay.
        built["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    if not opts.config:
        return built
    user = read_user_config(opts.config, plugin)
    check_agreement(user, config, plugin, opts.config, stage)
    return merge(built, user)


def apply(training_args: dict[str, Any], ds_config: dict[str, Any]) -> None:
    """Hand the config to the Trainer, with the distributed set-up DeepSpeed needs.

    DeepSpeed always runs in a process group: a run started without a launcher becomes a group of one (as
    DeepSpeed's own launcher does). On a machine without GPUs, accelerate would not give DeepSpeed a backend,
    so the process group is set up here over gloo and the Trainer told to use it.
    """
    import torch

    training_args["deepspeed"] = ds_config
    training_args["use_cpu"] = False
    training_args.update(optimizer_arguments(ds_config))
    if os.environ.get("LOCAL_RANK") is None:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not torch.cuda.is_available():
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        try:
            PartialState(backend="gloo")
        finally:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        training_args["accelerator_config"] = {"use_configured_state": True}


def optimizer_arguments(ds_config: dict[str, Any]) -> dict[str, float]:
    """Optimizer settings lmflow has no flag for, taken from the DeepSpeed JSON so the Trainer agrees with it."""
    params = (ds_config.get("optimizer") or {}).get("params") or {}
    out: dict[str, float] = {}
    betas = params.get("betas")
    if isinstance(betas, (list, tuple)) and len(betas) == 2:
        out["adam_beta1"], out["adam_beta2"] = float(betas[0]), float(betas[1])
    if isinstance(params.get("eps"), (int, float)):
        out["adam_epsilon"] = float(params["eps"])
    return out


def read_user_config(path: str, plugin: str) -> dict[str, Any]:
    file = Path(path)
    flag = f"--{plugin}-config"
    if not file.exists():
        raise ValueError(f"{flag} {path} does not exist; pass the path of a DeepSpeed JSON file")
    try:
        text = read_input_text(file, flag, "pass the path of a DeepSpeed JSON file")
    except LmflowError as exc:  # not a regular file, too large, not UTF-8
        raise ValueError(str(exc)) from None
    try:
        data = json.loads(text)
    except (RecursionError, json.JSONDecodeError) as exc:
        raise ValueError(f"{flag} {path} is not valid JSON ({exc}); fix the file") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{flag} {path} must hold a JSON object (a DeepSpeed config)")
    return data


# The DeepSpeed keys that lmflow's own options decide: the flag that sets each, and its value in the run.
AGREED = {
    ("train_micro_batch_size_per_gpu",): ("--batch-size", lambda c: c.batch_size),
    ("gradient_accumulation_steps",): ("--grad-accum", lambda c: c.grad_accum),
    ("gradient_clipping",): ("--max-grad-norm", lambda c: c.max_grad_norm),
    ("bf16", "enabled"): ("--bf16", lambda c: bool(c.bf16)),
    ("fp16", "enabled"): ("--fp16", lambda c: bool(c.fp16)),
    ("optimizer", "params", "lr"): ("--learning-rate", lambda c: c.learning_rate),
    ("optimizer", "params", "weight_decay"): ("--weight-decay", lambda c: c.weight_decay),
}


def check_agreement(user: dict, config: RunConfig, plugin: str, path: str, stage: int) -> None:
    """A value in the user's JSON that contradicts the run's own options is an error naming both."""

    def lookup(keys: tuple[str, ...]) -> Any:
        value: Any = user
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    theirs = lookup(("zero_optimization", "stage"))
    if theirs not in (None, "auto", stage):
        raise ValueError(
            f"{path} sets zero_optimization.stage to {theirs}, but the {plugin} plugin runs stage {stage}; use "
            f"the zero{theirs} plugin, or remove zero_optimization.stage from the file"
        )
    if user.get("train_batch_size", "auto") != "auto":
        raise ValueError(
            f"{path} sets train_batch_size, which lmflow derives from --batch-size x --grad-accum x the number "
            'of processes; remove it (or make it "auto") and set --batch-size instead'
        )
    for keys, (flag, value_of) in AGREED.items():
        theirs, mine = lookup(keys), value_of(config)
        if theirs is None or theirs == "auto" or theirs == mine:
            continue
        raise ValueError(
            f"{path} sets {'.'.join(keys)} to {theirs!r} but the run's {flag} gives {mine!r}; set {flag} "
            'instead, or remove the key or make it "auto"'
        )


def merge(base: dict, override: dict) -> dict:
    """``override`` merged into a copy of ``base``, nested mappings key by key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif value != "auto" or key not in out:
            out[key] = value
    return out


CONFLICTS = {
    "lisa": (
        "DeepSpeed ZeRO partitions the optimizer once, for the parameters trainable when training starts, so "
        "LISA's layer switching cannot take effect; run LISA with plain data parallelism (--nproc), where it "
        "already keeps optimizer state only for the active layers"
    ),
    "fsdp": "both shard the model across processes; choose one engine",
}


def hooks(plugin: str, stage: int) -> tuple[Any, ...]:
    """The hook implementations of the ``zero<stage>`` plugin (the two plugins differ only in the stage)."""
    other = "zero2" if stage == 3 else "zero3"

    @hookimpl
    def declare_options() -> list[PluginOption]:
        return options(stage)

    @hookimpl
    def declare_conflicts() -> dict[str, str]:
        return {**CONFLICTS, other: "choose one ZeRO stage"}

    @hookimpl
    def validate_config(config: RunConfig) -> list[str]:
        return problems(config, plugin, stage)

    @hookimpl
    def adjust_training_args(config: RunConfig, training_args: dict[str, Any]) -> None:
        apply(training_args, build(config, plugin, stage))

    return declare_options, declare_conflicts, validate_config, adjust_training_args
