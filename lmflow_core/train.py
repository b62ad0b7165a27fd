"""The runner: configure -> check -> tokenizer -> data -> model -> Trainer -> save -> evaluate.

Every hook call of a run is in :func:`run`, in the order it happens. Everything a user can get wrong is checked
before the model is loaded.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig, build_config, core_fields, load_config_file, resolve_plugin_options
from .errors import ConfigError, PluginError
from .evaluation import evaluate_hooks
from .hookspecs import StepContext
from .loading import model_config_for, tokenizer_for, weights_for
from .models import block_size_for, stored_run
from .options import parse_plugin_names
from .plugins import RunPlugins, call_each, discover_plugins, fold, merge_each, select_plugins
from .report import Reporter, format_duration, quiet_libraries
from .rundir import (
    OutputPlan,
    OutputTracker,
    RunRecorder,
    check_inputs_outside,
    claim_output_dir,
    is_main_process,
    plan_output_dir,
)


@dataclass
class RunResult:
    """What a finished run returns (and records in ``lmflow_run.json``)."""

    output_dir: str
    global_step: int
    epochs: float
    losses: list[tuple[int, float]]
    train_seconds: float
    tokens_seen: int
    eval_metrics: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[str, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.train_seconds if self.train_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "epochs": self.epochs,
            "losses": self.losses,
            "train_seconds": round(self.train_seconds, 3),
            "tokens_seen": self.tokens_seen,
            "tokens_per_second": round(self.tokens_per_second, 1),
            "eval": self.eval_metrics,
            "samples": [{"prompt": p, "reply": r} for p, r in self.samples],
            "data": self.data,
        }


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


def configure(
    config: RunConfig | dict[str, Any] | str | os.PathLike | None = None,
    *,
    config_file: str | os.PathLike | None = None,
    extra_plugins: Any = (),
    **settings: Any,
) -> tuple[RunConfig, RunPlugins]:
    """Resolve the run configuration and select its plugins, reporting every problem at once.

    Args:
        config: a :class:`RunConfig`, a dict of settings, or a path to a YAML file.
        config_file: a YAML file applied under ``config``/``settings`` (what ``--config`` does).
        extra_plugins: plugin objects used without being installed, as ``{name: plugin}`` or
            ``[(name, plugin), ...]``; they run after the plugins named in ``plugins``.
        settings: individual settings, highest precedence (what flags do).

    Raises:
        ConfigError, PluginError: with every problem found.
    """
    from .demo import demo_settings

    layers: list[dict[str, Any]] = []
    if config_file is not None:
        layers.append(load_config_file(config_file))
    if isinstance(config, RunConfig):
        defaults = RunConfig()
        explicit = {
            f.name: getattr(config, f.name)
            for f in core_fields()
            if getattr(config, f.name) != getattr(defaults, f.name)
        }
        layers.append({**explicit, **config.plugin_options})
    elif isinstance(config, dict):
        layers.append(dict(config))
    elif config is not None:
        layers.append(load_config_file(config))
    layers.append(settings)
    given = {k: v for layer in layers for k, v in layer.items()}
    extra = list(extra_plugins.items()) if isinstance(extra_plugins, dict) else list(extra_plugins)
    if given.get("model") is None and given.get("dataset") is None:
        names = parse_plugin_names(given.get("plugins"))
        layers.insert(0, {**demo_settings(names, given), **plugin_demo_settings(names, extra, given)})
    run_config, problems = build_config(*layers, plugin_names=discover_plugins)
    run_plugins = select_plugins(run_config.plugins, extra)
    run_config.plugins = list(run_plugins.names)
    problems += resolve_plugin_options(run_config, run_plugins.options)
    if problems:  # the plugins' own checks (validate_config) need the model's configuration: see check_run
        raise ConfigError.collect(problems)
    config_files = [config_file, config if isinstance(config, (str, os.PathLike)) else None]
    check_inputs_outside(Path(run_config.output_dir), [("--config", str(f)) for f in config_files if f])
    return run_config, run_plugins


def plugin_demo_settings(
    names: list[str], extra: list[tuple[str, Any]], given: dict[str, Any]
) -> dict[str, Any]:
    """The selected plugins' ``demo_settings`` merged; one setting set differently by two is an error."""
    return merge_each(
        call_each(select_plugins(names, extra).hook.demo_settings, given=dict(given)),
        lambda key: f"the demo's {key}",
        PluginError,
        "give --model and --dataset, or run the demo of one of them",
    )


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


def run(
    config: RunConfig | dict[str, Any] | str | os.PathLike | None = None,
    *,
    extra_plugins: Any = (),
    reporter: Reporter | None = None,
    **settings: Any,
) -> RunResult:
    """Fine-tune a causal language model.

    ``run()`` with no arguments fine-tunes the bundled demo. Otherwise pass settings as keyword arguments
    (``run(model="gpt2", dataset="data.json", template="chatml")``), a dict, a YAML path or a
    :class:`RunConfig`. Installed plugins are named with ``plugins=["lisa"]``; plugin objects that are not
    installed can be passed directly with ``extra_plugins={"name": module}``.
    """
    config, run_plugins = configure(config, extra_plugins=extra_plugins, **settings)
    return execute(config, run_plugins, reporter)


def execute(config: RunConfig, run_plugins: RunPlugins, reporter: Reporter | None = None) -> RunResult:
    """Run a configured fine-tuning (see :func:`run`)."""
    from .data.pipeline import check_vocabulary, prepare_data
    from .models import model_source

    report = (reporter or Reporter(main=is_main_process())).activate()
    hook = run_plugins.hook
    quiet_libraries()

    # 1. Everything a user can get wrong, before any model loads.
    output_dir = Path(config.output_dir)
    checked = check_run(config, run_plugins)
    plan, template_name, template = checked.plan, checked.template_name, checked.template
    train_raw, eval_raw, block_size = checked.train_raw, checked.eval_raw, checked.block_size
    model_config, resume_from = checked.model_config, checked.plan.resume_from
    from .trainer import build_trainer, save_final, training_arguments  # after the checks: a mistake is quick

    training_args = training_arguments(config, run_plugins, eval_raw is not None)
    # Every process has judged the output directory before the first one writes to it.
    _wait_for_everyone()

    report.header(config, run_plugins, model_source(config), template_name, block_size)
    if config.template and not train_raw.uses_template:
        report.note(
            f"--template {config.template} is not used: {train_raw.type} data is not rendered by a template"
        )
    if plan.note:
        report.note(plan.note)

    # 2. Tokenizer and data (loading steps as every command takes them: lmflow_core.loading).
    tokenizer = tokenizer_for(config, run_plugins)
    train_data, eval_data, data_stats = prepare_data(
        config, run_plugins, tokenizer, template, block_size, train_raw, eval_raw, report
    )

    # 3. Model.
    model = weights_for(config, run_plugins, model_config)  # model_init_kwargs, then load_model
    model = fold(hook.prepare_model, "model", config=config, model=model, tokenizer=tokenizer)
    check_vocabulary(model, data_stats)
    report.model(model)

    # 4. Training.
    trainer = build_trainer(
        config, run_plugins, training_args, model, tokenizer, train_data, eval_data, report
    )
    outputs = OutputTracker(output_dir, plan.outputs)
    if is_main_process():
        claim_output_dir(plan, output_dir)
    record = RunRecorder(output_dir, config, run_plugins, template_name, block_size, outputs)
    record.write(status="running")
    trainer.lmflow_record = record
    if resume_from is not None:
        hook.on_checkpoint_load(config=config, checkpoint_dir=str(resume_from))
    started = time.monotonic()
    train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.monotonic() - started

    # 5. Save, evaluate, record.
    jinja = template.to_jinja() if template is not None else None
    if jinja:
        # Other tools (transformers' apply_chat_template, serving engines) then format chats exactly as trained.
        tokenizer.chat_template = jinja
    save_final(trainer, tokenizer, output_dir, record)
    model = trainer.model
    if trainer.is_world_process_zero():
        with outputs.watch():
            hook.on_train_end(config=config, model=model, tokenizer=tokenizer, output_dir=str(output_dir))
    # Called without evaluation data too (dataset None): a plugin may score the model on its own tasks.
    eval_metrics = evaluate_hooks(run_plugins, config, model, tokenizer, eval_data)
    samples = (
        _samples(run_plugins, config, model, tokenizer, template)
        if config.sample_prompts and template and _generates(model)
        else []
    )
    state = trainer.state
    result = RunResult(
        output_dir=str(output_dir),
        global_step=state.global_step,
        epochs=round(state.epoch or 0.0, 3),
        losses=[(h["step"], h["loss"]) for h in state.log_history if "loss" in h],
        train_seconds=float(train_output.metrics.get("train_runtime", train_seconds)),
        tokens_seen=int(state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)),
        eval_metrics=eval_metrics,
        samples=samples,
        data=data_stats,
    )
    if trainer.is_world_process_zero():
        record.write(status="completed", result=result)
    report.summary(result)
    return result


@dataclass
class CheckedRun:
    """What :func:`check_run` found: the plan for the output directory, template, raw data, model config."""

    plan: OutputPlan
    template_name: str | None
    template: Any
    train_raw: Any
    eval_raw: Any
    model_config: Any
    block_size: int


def check_run(config: RunConfig, run_plugins: RunPlugins) -> CheckedRun:
    """Check everything a user can get wrong in a run without loading a model or changing a file.

    The first step of every run; ``lmflow run --nproc N`` also calls it before starting its processes, so
    that a mistake is reported once.
    """
    from .catalog import get_template
    from .data import load_raw_dataset
    from .data.pipeline import check_packing
    from .models import model_source

    hook = run_plugins.hook
    inputs = [
        ("--dataset", config.dataset),
        ("--eval-dataset", config.eval_dataset),
        ("--model", config.model),
        ("--tokenizer", config.tokenizer),
        ("--template", config.template),
    ]
    stored = stored_run(model_source(config))
    template_name = config.template or stored.get("template")
    template = get_template(template_name) if template_name else None

    def normalize(record: Any, declared_type: str | None, where: str, data_file: Any) -> Any:
        return hook.normalize_record(
            config=config, record=record, declared_type=declared_type, where=where, data_file=data_file
        )

    if not config.dataset:
        raise ConfigError(
            "no training data",
            "pass --dataset (a .json/.jsonl file, a directory of them, or a hub dataset org/name)",
        )
    # The plugins' validate_config (every problem at once), then configure_model: before the output directory
    # is judged and the data is read.
    model_config = model_config_for(config, run_plugins)
    plan = plan_output_dir(config, Path(config.output_dir), inputs)
    if not hook.normalize_record.get_hookimpls():
        normalize = None  # the core's own formats: records read from files are cached
    reading = {
        "dataset_format": config.dataset_format,
        "dataset_config": config.dataset_config,
        "dataset_revision": config.dataset_revision,
    }
    train_raw = load_raw_dataset(config.dataset, template, config.max_samples, normalize, **reading)
    eval_raw = (
        load_raw_dataset(
            config.eval_dataset, template, config.max_samples, normalize, **reading, purpose="eval"
        )
        if config.eval_dataset
        else None
    )
    for raw in (train_raw, eval_raw):
        if raw is not None and raw.uses_template and template is None:
            raise ConfigError(
                f"{raw.name} holds conversations, which need a template",
                "pass --template NAME (see `lmflow templates list`)",
            )
    if train_raw.paired != (eval_raw.paired if eval_raw is not None else train_raw.paired):
        raise ConfigError(
            f"{train_raw.name} holds {train_raw.type} records but {eval_raw.name} holds {eval_raw.type} ones",
            "evaluate on data of the training data's kind",
        )
    if train_raw.paired and not hook.compute_loss.get_hookimpls():
        raise ConfigError(
            f"{train_raw.name} holds preference pairs (chosen and rejected answers), which train with a "
            "pairwise loss",
            "add --plugins dpo (or reward_model), or train on the chosen answers as conversations",
        )
    if train_raw.paired and config.packing:
        raise ConfigError(
            "--packing packs examples of one sequence each; preference pairs are two", "drop --packing"
        )
    check_packing(config, model_config)
    block_size = block_size_for(config, model_config, stored.get("block_size"))
    return CheckedRun(plan, template_name, template, train_raw, eval_raw, model_config, block_size)


def _wait_for_everyone() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------------------------
# After training
# --------------------------------------------------------------------------------------------------------------


def _generates(model: Any) -> bool:
    """Whether the trained model writes text (a reward model scores it instead)."""
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else True


def _samples(
    run_plugins: RunPlugins, config: RunConfig, model: Any, tokenizer: Any, template: Any
) -> list[tuple[str, str]]:
    from .generate import GenerationOptions, reply
    from .templates import Conversation, Message

    out = []
    for prompt in config.sample_prompts:
        conversation = Conversation([Message("user", prompt)])
        options = GenerationOptions(max_new_tokens=48, greedy=True)
        answer = reply(run_plugins.hook, model, tokenizer, template, conversation, options, config=config)
        out.append((prompt, answer.text))
    return out


__all__ = ["RunResult", "StepContext", "configure", "execute", "format_duration", "run"]
