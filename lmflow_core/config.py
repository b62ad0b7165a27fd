"""The run configuration: one typed object built from defaults, a YAML file and command-line flags.

Precedence, lowest first: the bundled demo's settings (only when neither a model nor a dataset is given),
the ``--config`` YAML file, then flags given on the command line. Every field can be set in the file under its
own name; a plugin's options live in a section named after the plugin. Problems are collected and reported
together, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .errors import ConfigError, PluginError
from .options import Option, parse_plugin_names
from .stash import Stash

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
#: --dataset-format values: how records are read (lmflow_core.data.formats reads them).
DATASET_FORMATS = ("auto", "lmflow", "openai", "sharegpt", "alpaca", "text", "text2text", "preference")
MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")


def opt(default: Any, help: str, group: str, **settings: Any) -> Any:
    """A config field described by an :class:`Option`: its ``--help`` text, its help group and its checks
    (``min``, ``choices``...). The option's name and type are the field's, filled in once the class exists."""
    option = Option("", object, default, help, group=group, **settings)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"option": option})
    return field(default=default, metadata={"option": option})


@dataclass
class RunConfig:
    """Everything a run needs. Build it in Python, from YAML (:func:`load_config_file`) or from CLI flags."""

    # Model
    model: str | None = opt(
        None,
        "Hugging Face model id or local model directory. Omit to fine-tune the bundled demo model.",
        "Model",
    )
    tokenizer: str | None = opt(None, "Tokenizer id or directory (default: the model's own).", "Model")
    random_init: bool = opt(
        False, "Build the model from its config with seeded random weights (training from scratch).", "Model"
    )
    model_dtype: str = opt(
        "float32",
        "Dtype the weights are loaded in. Keep float32 with --bf16/--fp16 (mixed precision).",
        "Model",
        choices=MODEL_DTYPES,
    )
    trust_remote_code: bool = opt(False, "Allow model code from the hub repository to run.", "Model")

    # Data
    dataset: str | None = opt(
        None,
        "Training data: a .json/.jsonl file, a directory of them, or a Hugging Face hub dataset "
        "(org/name or org/name:split; a local path of that name wins). See README, Data formats.",
        "Data",
    )
    eval_dataset: str | None = opt(
        None,
        "Evaluation data, same forms (a hub dataset without a split reads its validation or test split); "
        "scored at the end of the run.",
        "Data",
    )
    dataset_format: str = opt(
        "auto",
        "How records are read: auto (detected from each record's keys), lmflow, openai, sharegpt, alpaca, "
        "text, text2text or preference (chosen/rejected pairs).",
        "Data",
        choices=DATASET_FORMATS,
    )
    preprocessing_workers: int | None = opt(
        None,
        "Processes that tokenize the data (default: the cores available; one under 10,000 records).",
        "Data",
        min=1,
    )
    dataset_config: str | None = opt(
        None, "Configuration (subset) of a hub dataset, for --dataset and --eval-dataset.", "Data"
    )
    dataset_revision: str | None = opt(
        None, "Revision (commit, branch or tag) of a hub dataset; the commit read is recorded.", "Data"
    )
    template: str | None = opt(
        None,
        "Conversation template for conversation data (see `lmflow templates list`); default: the one stored "
        "with the model.",
        "Data",
    )
    block_size: int | None = opt(
        None,
        "Longest example in tokens; longer ones are truncated and counted. Default: the model's context, at "
        "most 1024.",
        "Data",
        min=8,
    )
    group_texts: bool = opt(
        True,
        "For text_only data, concatenate texts and cut them into block-size chunks (no padding).",
        "Data",
    )
    max_samples: int | None = opt(
        None, "Use only the first N records of each dataset (for quick trials).", "Data", min=1
    )
    packing: bool = opt(
        False,
        "Pack several training examples into each block of --block-size tokens, without attention across "
        "them (less padding, faster training).",
        "Data",
    )

    # Training
    output_dir: str = opt("output", "Where checkpoints and the final model are written.", "Training")
    overwrite: bool = opt(False, "Replace an existing run in --output-dir.", "Training")
    resume: str | None = opt(
        None,
        "Resume from the latest checkpoint in --output-dir (--resume) or from a checkpoint path.",
        "Training",
        flag_value="latest",
        metavar="[PATH]",
    )
    plugins: list[str] = opt(
        [], "Plugins to use, comma-separated (see `lmflow plugins`).", "Training", parse=parse_plugin_names
    )
    epochs: float = opt(3.0, "Number of passes over the training data.", "Training", min_exclusive=0)
    max_steps: int | None = opt(
        None, "Stop after this many optimizer steps (overrides --epochs).", "Training", min=1
    )
    learning_rate: float = opt(2e-5, "Peak learning rate.", "Training", min_exclusive=0)
    lr_scheduler: str = opt("linear", "Learning-rate schedule.", "Training", choices=SCHEDULERS)
    warmup: float = opt(
        0.0, "Warm-up length: a number of steps, or a fraction of all steps when below 1.", "Training", min=0
    )
    weight_decay: float = opt(0.0, "AdamW weight decay.", "Training", min=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables clipping).", "Training", min=0)
    optimizer: str | None = opt(
        None,
        "Optimizer name as transformers knows it (e.g. adamw_torch, adafactor, sgd). Default: transformers' own "
        "(fused AdamW on recent torch).",
        "Training",
    )
    batch_size: int = opt(8, "Examples per device per step.", "Training", min=1)
    eval_batch_size: int | None = opt(
        None, "Examples per device per evaluation step (default: --batch-size).", "Training", min=1
    )
    grad_accum: int = opt(1, "Gradient accumulation steps per optimizer step.", "Training", min=1)
    seed: int = opt(42, "Random seed for initialisation, data order and dropout.", "Training", min=0)
    bf16: bool = opt(False, "Train in bfloat16 mixed precision.", "Training")
    fp16: bool = opt(False, "Train in float16 mixed precision (CUDA only).", "Training")
    gradient_checkpointing: bool = opt(
        False, "Recompute activations in the backward pass to save memory.", "Training"
    )
    dataloader_workers: int = opt(0, "Worker processes that load batches.", "Training", min=0)
    group_by_length: bool = opt(
        False,
        "Batch examples of similar length together: less padding, faster steps (order shuffled in groups).",
        "Training",
    )

    # Checkpoints and logging
    logging_steps: int = opt(10, "Log the loss every N optimizer steps.", "Checkpoints and logging", min=1)
    save_steps: int | None = opt(
        500,
        "Write a checkpoint every N steps, and at the end; 0 for none (only the final model).",
        "Checkpoints and logging",
        min=0,
    )
    save_total_limit: int | None = opt(
        3, "Keep at most N checkpoints (oldest deleted first).", "Checkpoints and logging", min=1
    )
    eval_steps: int | None = opt(
        None,
        "Also compute the eval loss every N steps (needs --eval-dataset).",
        "Checkpoints and logging",
        min=1,
    )
    eval_stride: int | None = opt(
        None,
        "When scoring texts longer than the block size, slide the window by this many tokens (default: half).",
        "Checkpoints and logging",
        min=1,
    )
    report_to: str = opt(
        "none",
        "Experiment trackers for transformers (e.g. tensorboard, wandb) or none.",
        "Checkpoints and logging",
    )
    sample_prompts: list[str] = opt(
        [],
        "User messages to answer with the trained model at the end of the run.",
        "Checkpoints and logging",
        flag="--sample-prompt",
    )

    # Plugin options: {plugin_name: {option_name: value}}; filled with defaults once plugins are selected.
    plugin_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per-run plugin state (``config.stash[KEY]``, see :mod:`lmflow_core.stash`); not a setting.
    stash: Stash = field(default_factory=Stash, repr=False, compare=False)

    def options_for(self, plugin: str) -> SimpleNamespace:
        """The options of ``plugin`` as attributes (``config.options_for("lisa").interval_steps``)."""
        return SimpleNamespace(**self.plugin_options.get(plugin, {}))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict, as written to the YAML/JSON run record (plugin sections at top level)."""
        data = {f.name: getattr(self, f.name) for f in core_fields()}
        data.update({k: dict(v) for k, v in self.plugin_options.items()})
        return data

    @property
    def is_demo(self) -> bool:
        """True when the run uses the bundled demo model (no --model given)."""
        return self.model is None


def _complete_options(cls: type) -> None:
    """Give each field's :class:`Option` the field's name and type (``int | None``: ``int``, and ``None`` is
    a value), which :func:`opt` cannot know."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "option" not in f.metadata:
            continue
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kinds = [typing.get_origin(a) or a for a in args if a is not type(None)]
        assert len(kinds) == 1, f"{f.name}: an option has one type besides None"
        option = dataclasses.replace(
            f.metadata["option"], name=f.name, type=kinds[0], nullable=type(None) in args
        )
        f.metadata = types.MappingProxyType({"option": option})


_complete_options(RunConfig)


def core_fields() -> list[dataclasses.Field]:
    """The user-settable fields (everything but ``plugin_options`` and ``stash``)."""
    return [f for f in dataclasses.fields(RunConfig) if f.name not in ("plugin_options", "stash")]


def core_options() -> list[Option]:
    """The :class:`Option` of every user-settable field, in declaration order."""
    return [f.metadata["option"] for f in core_fields()]


FIELD_NAMES = frozenset(f.name for f in core_fields())


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) run config into a dict, checking it is a mapping of known keys."""
    import yaml

    from .inputs import read_input_text

    path = Path(path)
    text = read_input_text(path, "config file", "check the path given to --config", ConfigError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}", "fix the syntax") from exc
    except RecursionError:
        raise ConfigError(
            f"config file {path} is nested too deeply to read", "a run config is a mapping of option: value"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(
    *layers: dict[str, Any], plugin_names: Callable[[], Iterable[str]] = tuple
) -> tuple[RunConfig, list[str]]:
    """Merge layers of settings (later wins) into a :class:`RunConfig`.

    Keys that are not core fields are taken as plugin sections (``{plugin: {option: value}}``); they are
    checked against the plugins' declared options later, by :func:`resolve_plugin_options`.

    Args:
        plugin_names: returns the names of the installed plugins (``plugins.discover_plugins``). Asked only
            for a key that is neither a field nor a mapping, to tell a plugin section written as a value
            (``lisa: 3``) from a misspelled option.

    Returns the config and the problems found (unknown keys, wrong types, out-of-range values).
    """
    merged: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for layer in layers:
        for key, value in layer.items():
            if key in FIELD_NAMES:
                merged[key] = value
            elif key == "plugin_options" and isinstance(value, dict):
                for plugin, opts in value.items():
                    sections.setdefault(plugin, {}).update(opts or {})
            elif isinstance(value, dict):
                sections.setdefault(key, {}).update(value)
            elif key in _installed(plugin_names):
                problems.append(f"the options of plugin '{key}' must be a mapping ({key}: {{option: value}})")
            else:
                close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
                guess = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(f"unknown option '{key}'{guess}")
    values: dict[str, Any] = {}
    for option in core_options():
        if option.name not in merged:
            continue
        value, problem = option.check(None, merged[option.name])
        if problem:
            problems.append(problem)
        else:
            values[option.name] = value
    config = RunConfig(**values)
    config.plugin_options = sections
    problems.extend(check_config(config))
    return config, problems


def _installed(plugin_names: Callable[[], Iterable[str]]) -> set[str]:
    try:
        return set(plugin_names())
    except PluginError:  # inconsistent entry points are reported when a plugin is selected
        return set()


def check_config(config: RunConfig) -> list[str]:
    """Cross-field checks of the core options. Returns the problems (empty when all is well)."""
    problems = []
    if config.bf16 and config.fp16:
        problems.append("--bf16 and --fp16 are both set; choose one")
    if config.fp16:
        import torch

        if not torch.cuda.is_available():
            problems.append("--fp16 needs a CUDA GPU and none is available; use --bf16 or full precision")
    if config.resume and config.overwrite:
        problems.append("--resume and --overwrite contradict each other; drop one")
    if config.eval_steps and not config.eval_dataset:
        problems.append("--eval-steps needs --eval-dataset")
    if config.model is None and config.random_init:
        problems.append(
            "--random-init needs --model (a config directory or hub id); the demo is random already"
        )
    return problems


def resolve_plugin_options(config: RunConfig, declared: dict[str, list[Option]]) -> list[str]:
    """Check ``config.plugin_options`` against what the selected plugins declare, filling in defaults.

    Args:
        declared: ``{plugin: [Option, ...]}`` for the selected plugins (``RunPlugins.options``).

    Returns the problems found: a section for a plugin that is not selected, an unknown option, a bad value.
    """
    problems = []
    resolved: dict[str, dict[str, Any]] = {}
    for plugin in config.plugin_options:
        if plugin not in declared:
            problems.append(
                f"options given for plugin '{plugin}', which is not selected; add it to --plugins or remove "
                "its options"
            )
    for plugin, options in declared.items():
        given = dict(config.plugin_options.get(plugin, {}))
        section: dict[str, Any] = {}
        by_name = {o.name: o for o in options}
        for key in given:
            if key.replace("-", "_") not in by_name:
                close = difflib.get_close_matches(key, list(by_name), n=1)
                guess = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(f"plugin '{plugin}' has no option '{key}'{guess}")
        given = {k.replace("-", "_"): v for k, v in given.items()}
        for option in options:
            value, problem = option.check(plugin, given.get(option.name, option.default))
            if problem:
                problems.append(problem)
            section[option.name] = value
        resolved[plugin] = section
    config.plugin_options = resolved
    return problems
