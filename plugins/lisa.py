"""LISA: Layerwise Importance Sampled AdamW (plugin ``lisa``; Pan et al., arXiv 2403.17919).

Every ``--lisa-interval-steps`` optimizer steps, ``--lisa-activated-layers`` decoder layers drawn at random are
trained and all other decoder layers are frozen; the embeddings, the LM head and the other parameters outside
the decoder layers (final norm) stay trainable unless ``--lisa-freeze-embeddings`` / ``--lisa-freeze-lm-head``.

    lmflow run --model M --dataset D --plugins lisa --lisa-activated-layers 2 --lisa-interval-steps 20

How it is done, and why:

* **Optimizer state only for the trainable parameters.** The trainer's optimizer is created over every
  parameter (so that weight-decay groups, the learning-rate schedule and checkpointed optimizer state keep one
  fixed layout), but only parameters that receive gradients get optimizer state. When a layer is switched off,
  its gradients and its optimizer state (AdamW's two moments) are released; a layer switched on starts with
  fresh state. Memory is therefore that of training the active layers, not the whole model.
* **The schedule is a function of the step.** The layers of switching period ``n = step // interval`` are
  drawn from a random generator seeded with ``(seed, n)``: every process draws the same layers without
  communicating, and a resumed run continues with the same schedule. The active layers are also written into
  every checkpoint (``lisa_state.json``) and restored from it on ``--resume``.
* **Data parallelism.** Distributed data parallel training registers its gradient hooks when the model is
  wrapped; parameters frozen at that moment would never be averaged once they are switched on. So every
  parameter is left trainable until the model is wrapped, layers are frozen only when training begins, and
  DDP is told that some parameters receive no gradient in a step (``ddp_find_unused_parameters``). Frozen
  parameters keep no gradient, so after every step the weights are the same on every process.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmflow_core import ConfigError, LmflowError, PluginOption, StashKey, hookimpl, note

if TYPE_CHECKING:
    from lmflow_core import RunConfig, StepContext

NAME = "lisa"
STATE_FILE = "lisa_state.json"

# Where the decoder layers live in common architectures, tried before a generic search.
KNOWN_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Mixtral, Qwen2/2.5/3, Phi-3, Gemma 1/2/3 (text), Granite, InternLM2, Yi
    "model.language_model.layers",  # Gemma 3 and other multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J, Falcon, BLOOM, StarCoder
    "gpt_neox.layers",  # Pythia, GPT-NeoX
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
)


@hookimpl
def declare_options() -> list[PluginOption]:
    return [
        PluginOption(
            "interval_steps", int, 20, "Optimizer steps between two draws of the active layers.", min=1
        ),
        PluginOption("activated_layers", int, 2, "Decoder layers trained at a time.", min=1),
        PluginOption(
            "layers_attribute",
            str,
            None,
            "Attribute path of the decoder layer list (e.g. model.layers); found automatically when omitted.",
        ),
        PluginOption("freeze_embeddings", bool, False, "Keep the input embeddings frozen."),
        PluginOption("freeze_lm_head", bool, False, "Keep the output layer (LM head) frozen."),
    ]


@hookimpl
def declare_conflicts() -> dict[str, str]:
    return {
        "lora": "LISA trains whole decoder layers while LoRA freezes them and trains adapters instead",
    }


@hookimpl
def validate_config(config: RunConfig, model_config: Any) -> list[str]:
    """Check the options against the model's shape before its weights load."""
    options = config.options_for(NAME)
    problems = []
    layers = _layer_count(model_config)
    if layers is not None and options.activated_layers > layers:
        problems.append(
            f"--lisa-activated-layers {options.activated_layers} exceeds the model's {layers} decoder layers; "
            f"use --lisa-activated-layers {max(1, layers // 4)} or another value up to {layers}"
        )
    if _tied_embeddings(model_config) and options.freeze_embeddings != options.freeze_lm_head:
        problems.append(
            "this model's LM head shares its weights with the input embeddings, so one cannot be frozen "
            "without the other; pass both --lisa-freeze-embeddings and --lisa-freeze-lm-head, or neither"
        )
    return problems


@hookimpl
def prepare_model(config: RunConfig, model: Any, tokenizer: Any) -> None:
    """Find the decoder layers and remember the run's LISA state; every parameter stays trainable for now."""
    options = config.options_for(NAME)
    path, layers = find_layers(model, options.layers_attribute)
    if options.activated_layers > len(layers):
        raise ConfigError(
            f"--lisa-activated-layers {options.activated_layers} exceeds the {len(layers)} layers in {path}",
            f"use --lisa-activated-layers {len(layers)} or fewer",
        )
    for param in model.parameters():
        param.requires_grad_(True)
    state = LisaState(
        layers_path=path,
        layers=layers,
        interval=options.interval_steps,
        count=options.activated_layers,
        seed=config.seed,
        frozen_always=_frozen_extras(model, options),
    )
    config.stash[LISA] = state
    note(
        f"lisa: training {options.activated_layers} of the {len(layers)} decoder layers ({path}) at a time, "
        f"drawn anew every {options.interval_steps} steps; the others are frozen once training starts"
    )


@hookimpl
def adjust_training_args(config: RunConfig, training_args: dict[str, Any]) -> None:
    # Under DDP, frozen layers produce no gradient in a step: the reducer must expect that.
    training_args["ddp_find_unused_parameters"] = True


@hookimpl
def trainer_callbacks(config: RunConfig) -> list[Any]:
    from transformers import TrainerCallback

    run = config.stash.get(LISA, None)

    class LisaStart(TrainerCallback):
        """Freezes all but the active layers once the model is wrapped and the optimizer state is loaded."""

        def __init__(self) -> None:
            self.run = run  # keeps the state alive as long as the trainer

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.run is not None:
                self.run.activate(self.run.restored or self.run.draw(state.global_step), kwargs["optimizer"])

    return [LisaStart()] if run is not None else []


@hookimpl
def on_step(config: RunConfig, step: StepContext) -> None:
    run = config.stash.get(LISA, None)
    if run is not None and step.global_step % run.interval == 0 and step.global_step < step.max_steps:
        run.activate(run.draw(step.global_step), step.optimizer)


@hookimpl
def on_checkpoint_save(config: RunConfig, checkpoint_dir: str, is_main_process: bool) -> None:
    run = config.stash.get(LISA, None)
    if run is not None and is_main_process:
        Path(checkpoint_dir, STATE_FILE).write_text(json.dumps(run.to_dict(), indent=2) + "\n")


@hookimpl
def on_checkpoint_load(config: RunConfig, checkpoint_dir: str) -> None:
    run = config.stash.get(LISA, None)
    path = Path(checkpoint_dir, STATE_FILE)
    if run is None:
        return
    if not path.is_file():
        raise LmflowError(
            f"checkpoint {checkpoint_dir} has no {STATE_FILE}: it was not written by a LISA run",
            "resume without --plugins lisa, or start a new run",
        )
    saved = json.loads(path.read_text())
    active = [int(i) for i in saved.get("active_layers", [])]
    if saved.get("layers_path") != run.layers_path or any(i >= len(run.layers) for i in active):
        raise LmflowError(
            f"checkpoint {checkpoint_dir} was trained with other LISA layers ({saved.get('layers_path')})",
            "resume with the model and --lisa-layers-attribute the checkpoint was trained with",
        )
    run.restored = active


# --------------------------------------------------------------------------------------------------------------
# The state of a run
# --------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LisaState:
    """The decoder layers of one run and which of them are active."""

    layers_path: str
    layers: Any  # torch.nn.ModuleList
    interval: int
    count: int
    seed: int
    frozen_always: list[Any] = field(default_factory=list)  # parameters never trained (frozen embeddings...)
    active: list[int] = field(default_factory=list)
    restored: list[int] | None = None  # the active layers of the checkpoint a run resumes from
    switches: int = 0

    def draw(self, global_step: int) -> list[int]:
        """The active layers of the switching period that ``global_step`` falls in (same on every process)."""
        period = global_step // self.interval
        generator = random.Random(f"lisa-{self.seed}-{period}")
        return sorted(generator.sample(range(len(self.layers)), self.count))

    def activate(self, active: list[int], optimizer: Any) -> None:
        """Make ``active`` the trainable layers; release gradients and optimizer state of all others."""
        self.restored = None
        inner = innermost_optimizer(optimizer)
        for index, layer in enumerate(self.layers):
            on = index in active
            for param in layer.parameters():
                param.requires_grad_(on)
                if not on:
                    param.grad = None
                    if inner is not None:
                        inner.state.pop(param, None)
        for param in self.frozen_always:
            param.requires_grad_(False)
            param.grad = None
            if inner is not None:
                inner.state.pop(param, None)
        if active != self.active:
            self.switches += 1
        self.active = list(active)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers_path": self.layers_path,
            "num_layers": len(self.layers),
            "active_layers": self.active,
            "interval_steps": self.interval,
            "activated_layers": self.count,
            "seed": self.seed,
        }


# The run's LISA state, in its per-run store.
LISA = StashKey["LisaState"]()


def active_layers(config: RunConfig) -> list[int] | None:
    """The decoder layers being trained in the run of ``config`` (None when LISA is not used)."""
    run = config.stash.get(LISA, None)
    return None if run is None else list(run.active)


def innermost_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    import torch

    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


# --------------------------------------------------------------------------------------------------------------
# Finding the layers
# --------------------------------------------------------------------------------------------------------------


def find_layers(model: Any, attribute: str | None = None) -> tuple[str, Any]:
    """The decoder layer list of ``model``: ``(attribute path, ModuleList)``.

    ``attribute`` names it (``"model.layers"``); otherwise the known paths of common architectures are tried,
    then the longest ``ModuleList`` of identical blocks whose length is the configured number of layers.
    """
    import torch

    root = model
    if attribute:
        target = _get_path(root, attribute)
        if not isinstance(target, torch.nn.ModuleList) or len(target) == 0:
            raise ConfigError(
                f"--lisa-layers-attribute {attribute} is not a list of layers in this {type(model).__name__}",
                f"name the decoder layer list, e.g. {_guess_path(model) or 'model.layers'}",
            )
        return attribute, target
    expected = _layer_count(getattr(model, "config", None))
    for path in KNOWN_LAYER_PATHS:
        target = _get_path(root, path)
        if isinstance(target, torch.nn.ModuleList) and len(target) > 0:
            if expected is None or len(target) == expected:
                return path, target
    guess = _guess_path(model, expected)
    if guess is None:
        raise ConfigError(
            f"cannot find the decoder layers of {type(model).__name__}",
            "name them with --lisa-layers-attribute (the attribute path of the layer list, e.g. model.layers)",
        )
    return guess, _get_path(root, guess)


def _guess_path(model: Any, expected: int | None = None) -> str | None:
    import torch

    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if expected is not None and len(module) != expected:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name)
    return best[1] if best else None


def _get_path(root: Any, path: str) -> Any:
    target = root
    for part in path.split("."):
        target = getattr(target, part, None)
        if target is None:
            return None
    return target


def _layer_count(model_config: Any) -> int | None:
    if model_config is None:
        return None
    text = getattr(model_config, "get_text_config", None)
    model_config = text() if callable(text) else model_config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(model_config, key, None)
        if isinstance(value, int):
            return value
    return None


def _tied_embeddings(model_config: Any) -> bool:
    text = getattr(model_config, "get_text_config", None)
    text_config = text() if callable(text) else model_config
    return bool(
        getattr(text_config, "tie_word_embeddings", getattr(model_config, "tie_word_embeddings", False))
    )


def _frozen_extras(model: Any, options: Any) -> list[Any]:
    frozen = []
    if options.freeze_embeddings:
        frozen.extend(model.get_input_embeddings().parameters())
    if options.freeze_lm_head and model.get_output_embeddings() is not None:
        frozen.extend(model.get_output_embeddings().parameters())
    return frozen
