"""The runner: configure -> check -> tokenizer -> data -> model -> Trainer -> save -> evaluate.

Every hook call of a run is in :func:`run`, in the order it happens. Everything a user can get wrong is checked
before the model is loaded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from . import __version__
from .config import RunConfig, build_config, core_fields, load_config_file, resolve_plugin_options
from .errors import ConfigError, LmflowError
from .evaluation import evaluate_hooks
from .hookspecs import StepContext
from .loading import model_config_for, tokenizer_for, weights_for
from .models import RUN_RECORD, accelerator_available, block_size_for, stored_run
from .plugins import RunPlugins, fold, parse_plugin_names, select_plugins
from .report import Reporter, format_duration, quiet_libraries
from .rundir import (
    FINAL_STAGING,
    RUN_CONFIG,
    STAGING_PREFIX,
    OutputPlan,
    OutputTracker,
    atomic_write,
    check_inputs_outside,
    claim_output_dir,
    fsync_dir,
    fsync_tree,
    plan_output_dir,
    rotate_checkpoints,
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
    if given.get("model") is None and given.get("dataset") is None:
        layers.insert(0, demo_settings(parse_plugin_names(given.get("plugins")), given))
    run_config, problems = build_config(*layers)
    extra = list(extra_plugins.items()) if isinstance(extra_plugins, dict) else list(extra_plugins)
    run_plugins = select_plugins(run_config.plugins, extra)
    run_config.plugins = list(run_plugins.names)
    problems += resolve_plugin_options(run_config, run_plugins.options)
    if not problems:
        for found in run_plugins.hook.validate_config(config=run_config):
            problems.extend(found or [])
    if problems:
        raise ConfigError.collect(problems)
    config_files = [config_file, config if isinstance(config, (str, os.PathLike)) else None]
    check_inputs_outside(Path(run_config.output_dir), [("--config", str(f)) for f in config_files if f])
    return run_config, run_plugins


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
    from .defaults import model_source

    report = (reporter or Reporter(main=_is_main_process())).activate()
    hook = run_plugins.hook
    quiet_libraries()

    # 1. Everything a user can get wrong, before any model loads.
    output_dir = Path(config.output_dir)
    checked = check_run(config, run_plugins)
    plan, template_name, template = checked.plan, checked.template_name, checked.template
    train_raw, eval_raw, block_size = checked.train_raw, checked.eval_raw, checked.block_size
    model_config, resume_from = checked.model_config, checked.plan.resume_from
    training_args = _training_arguments(config, run_plugins, eval_raw is not None)
    # Every process has judged the output directory before the first one writes to it.
    _wait_for_everyone()

    report.header(config, run_plugins, model_source(config), template_name, block_size)
    if config.template and train_raw.type != "conversation":
        report.note(
            f"--template {config.template} is not used: {train_raw.type} data is not rendered by a template"
        )
    if plan.note:
        report.note(plan.note)

    # 2. Tokenizer and data (loading steps as every command takes them: lmflow_core.loading).
    tokenizer = tokenizer_for(config, run_plugins)
    train_data, eval_data, data_stats = _prepare_data(
        config, run_plugins, tokenizer, template, block_size, train_raw, eval_raw, report
    )

    # 3. Model.
    model = weights_for(config, run_plugins, model_config)  # model_init_kwargs, then load_model
    model = fold(hook.prepare_model, "model", config=config, model=model, tokenizer=tokenizer)
    _check_vocabulary(model, data_stats)
    report.model(model)

    # 4. Training.
    trainer = _build_trainer(
        config, run_plugins, training_args, model, tokenizer, train_data, eval_data, report
    )
    outputs = OutputTracker(output_dir, plan.outputs)
    if _is_main_process():
        claim_output_dir(plan, output_dir)
    record = _RunRecorder(output_dir, config, run_plugins, template_name, block_size, outputs)
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
    _save_final(trainer, tokenizer, output_dir, record)
    model = trainer.model
    if trainer.is_world_process_zero():
        with outputs.watch():
            hook.on_train_end(config=config, model=model, tokenizer=tokenizer, output_dir=str(output_dir))
    eval_metrics = (
        evaluate_hooks(run_plugins, config, model, tokenizer, eval_data) if eval_data is not None else {}
    )
    samples = (
        _samples(run_plugins, config, model, tokenizer, template)
        if config.sample_prompts and template
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
    from .data import load_raw_dataset
    from .defaults import model_source
    from .templates import get_template

    hook = run_plugins.hook
    inputs = [
        ("--dataset", config.dataset),
        ("--eval-dataset", config.eval_dataset),
        ("--model", config.model),
        ("--tokenizer", config.tokenizer),
        ("--template", config.template),
    ]
    plan = plan_output_dir(config, Path(config.output_dir), inputs)
    stored = stored_run(model_source(config))
    template_name = config.template or stored.get("template")
    template = get_template(template_name) if template_name else None

    def normalize(record: Any, declared_type: str | None, where: str) -> Any:
        return hook.normalize_record(record=record, declared_type=declared_type, where=where)

    if not config.dataset:
        raise ConfigError("no training data", "pass --dataset (a .json/.jsonl file or a directory)")
    train_raw = load_raw_dataset(config.dataset, template, config.max_samples, normalize)
    eval_raw = (
        load_raw_dataset(config.eval_dataset, template, config.max_samples, normalize)
        if config.eval_dataset
        else None
    )
    for raw in (train_raw, eval_raw):
        if raw is not None and raw.type == "conversation" and template is None:
            raise ConfigError(
                f"{raw.files[0]} holds conversations, which need a template",
                "pass --template NAME (see `lmflow templates list`)",
            )
    model_config = model_config_for(config, run_plugins)  # configure_model included
    _check_packing(config, model_config)
    block_size = block_size_for(config, model_config, stored.get("block_size"))
    return CheckedRun(plan, template_name, template, train_raw, eval_raw, model_config, block_size)


def _wait_for_everyone() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _prepare_data(
    config: RunConfig,
    run_plugins: RunPlugins,
    tokenizer: Any,
    template: Any,
    block_size: int,
    train_raw: Any,
    eval_raw: Any,
    report: Reporter,
) -> tuple[Any, Any, dict[str, Any]]:
    from .data import tokenize_dataset

    hook = run_plugins.hook

    def render(template: Any, conversation: Any) -> Any:
        return hook.format_conversation(
            template=template, conversation=conversation, add_generation_prompt=False, tokenizer=tokenizer
        )

    prepared, stats = {}, {}
    for split, raw in (("train", train_raw), ("eval", eval_raw)):
        if raw is None:
            continue
        data, split_stats = tokenize_dataset(
            raw,
            tokenizer,
            block_size,
            template,
            render,
            config.group_texts,
            cache_extra=_formatter_fingerprint(run_plugins),
        )
        report.data(split, raw, split_stats)
        data = fold(
            hook.prepare_dataset, "dataset", config=config, dataset=data, tokenizer=tokenizer, split=split
        )
        if len(data) == 0:
            raise LmflowError(
                f"the {split} dataset has no example left to train on", "check the data and --block-size"
            )
        prepared[split], stats[split] = data, split_stats.to_dict()
        if split == "train" and config.packing:
            prepared[split], stats[split]["packing"] = _pack(config, raw, data, block_size, report)
    return prepared["train"], prepared.get("eval"), stats


def _check_packing(config: RunConfig, model_config: Any) -> None:
    """Refuse --packing, before anything is loaded, for an architecture that would mix packed examples."""
    if config.packing:
        from .data import check_packing_support

        check_packing_support(model_config)


def _pack(config: RunConfig, raw: Any, data: Any, block_size: int, report: Reporter) -> tuple[Any, Any]:
    """Pack the training examples into rows of ``block_size`` tokens; report and return the packing stats.

    Evaluation data stays unpacked: it is scored example by example. Grouped text_only data fills every block
    already and is left as it is.
    """
    from .data import pack_dataset

    if raw.type == "text_only" and config.group_texts:
        report.note(
            "--packing: text_only data is already grouped into full blocks (--group-texts); pass "
            "--no-group-texts to pack whole texts instead"
        )
        return data, None
    packed, packing = pack_dataset(data, block_size)
    report.line(f"packing (train): {packing.summary()}")
    return packed, packing.to_dict()


def _formatter_fingerprint(run_plugins: RunPlugins) -> str:
    """Identifies the plugins that render conversations, for the tokenization cache key.

    An installed plugin is identified by its version; a plugin object passed from Python by a hash of its
    hook function (code and state), so editing it invalidates the cache.
    """
    from datasets.fingerprint import Hasher

    parts = []
    for impl in run_plugins.hook.format_conversation.get_hookimpls():
        info = run_plugins.infos.get(impl.plugin_name)
        try:
            identity = info.version if info else Hasher.hash(impl.function)
        except Exception:  # an object that cannot be hashed: never reuse a cache for it
            identity = os.urandom(8).hex()
        parts.append(f"{impl.plugin_name}={identity}")
    return ",".join(parts)


def _check_vocabulary(model: Any, data_stats: dict[str, Any]) -> None:
    """Every token id of the data must have an embedding row (a tokenizer that does not fit the model)."""
    embeddings = model.get_input_embeddings()
    # num_embeddings survives parameter partitioning (ZeRO-3), where the weight itself is empty.
    rows = getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0]
    for split, stats in data_stats.items():
        if stats["max_token_id"] >= rows:
            raise LmflowError(
                f"the {split} data has token id {stats['max_token_id']} but the model's embeddings have only "
                f"{rows} rows",
                "use the model's own tokenizer, or add --plugins vocab_extension to resize the embeddings for it",
            )


# --------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------


def _training_arguments(config: RunConfig, run_plugins: RunPlugins, has_eval: bool) -> TrainingArguments:
    """Build ``TrainingArguments`` before any model loads, so that bad settings fail early.

    Plugins adjust the keyword arguments first (``adjust_training_args``). Building the arguments this early
    is also what DeepSpeed ZeRO-3 needs to load a model already partitioned.
    """
    from transformers.integrations import get_reporting_integration_callbacks

    kwargs = _training_kwargs(config, has_eval)
    run_plugins.hook.adjust_training_args(config=config, training_args=kwargs)
    try:
        args = TrainingArguments(**kwargs)
        get_reporting_integration_callbacks(args.report_to)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(
            f"invalid training settings: {str(exc).strip().splitlines()[0]}", "check the run options"
        ) from exc
    return args


def _training_kwargs(config: RunConfig, has_eval: bool) -> dict[str, Any]:
    fields = TrainingArguments.__dataclass_fields__
    checkpointing = (
        "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    )
    kwargs = {
        "output_dir": config.output_dir,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps or -1,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": config.lr_scheduler,
        "warmup_steps": config.warmup,
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.eval_batch_size or config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "seed": config.seed,
        "data_seed": config.seed,
        "bf16": config.bf16,
        "fp16": config.fp16,
        # transformers renamed gradient_checkpointing to activation_checkpointing in 5.x; use what it knows.
        checkpointing: config.gradient_checkpointing,
        f"{checkpointing}_kwargs": {"use_reentrant": False} if config.gradient_checkpointing else None,
        "dataloader_pin_memory": accelerator_available(),
        # Without an accelerator transformers must be told to use the CPU: for bf16 autocast there, and so
        # that several processes (torchrun) train with DDP over gloo instead of each training alone.
        "use_cpu": not accelerator_available(),
        "logging_steps": config.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps" if config.save_steps else "no",
        "save_steps": config.save_steps or 500,
        "save_total_limit": config.save_total_limit,
        "eval_strategy": "steps" if (config.eval_steps and has_eval) else "no",
        "eval_steps": config.eval_steps,
        "report_to": [] if config.report_to == "none" else config.report_to.split(","),
        "dataloader_num_workers": config.dataloader_workers,
        "remove_unused_columns": False,
        "include_num_input_tokens_seen": "non_padding",
        "disable_tqdm": True,
        "log_level": "warning",
    }
    if config.optimizer:
        kwargs["optim"] = config.optimizer
    if config.group_by_length:
        # transformers 5 names it train_sampling_strategy; 4.x had the group_by_length flag.
        if "train_sampling_strategy" in fields:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    return kwargs


def _build_trainer(
    config: RunConfig,
    run_plugins: RunPlugins,
    args: TrainingArguments,
    model: Any,
    tokenizer: Any,
    train_data: Any,
    eval_data: Any,
    report: Reporter,
) -> Any:
    hook = run_plugins.hook
    hook_callback = HookCallback(config, run_plugins)
    callbacks = [hook_callback, report.progress_callback()]
    for extra in hook.trainer_callbacks(config=config):
        callbacks.extend(extra or [])
    trainer = LmflowTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data if config.eval_steps else None,
        data_collator=hook.data_collator(config=config, tokenizer=tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.lmflow_config = config
    trainer.lmflow_plugins = run_plugins
    hook_callback.trainer = trainer
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    return trainer


class LmflowTrainer(Trainer):
    """``transformers.Trainer`` with the ``wrap_optimizer`` hook and atomic checkpoints."""

    lmflow_config: RunConfig
    lmflow_plugins: RunPlugins
    _staging_root: str | None = None
    lmflow_step_loss: Any = None
    lmflow_record: _RunRecorder | None = None

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        # The returned losses of one optimizer step's micro-batches add up to that step's loss.
        loss = super().training_step(*args, **kwargs)
        self.lmflow_step_loss = loss if self.lmflow_step_loss is None else self.lmflow_step_loss + loss
        return loss

    def create_optimizer(self, model: Any = None) -> Any:
        optimizer = super().create_optimizer(model)
        self.optimizer = fold(
            self.lmflow_plugins.hook.wrap_optimizer,
            "optimizer",
            config=self.lmflow_config,
            model=self.model,
            optimizer=optimizer,
        )
        return self.optimizer

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # Tied weights (an LM head sharing the embedding matrix) are saved once; their absence is expected.
        pointers: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            pointers.setdefault(param.data_ptr(), []).append(name)
        missing = set(load_result.missing_keys)
        tied = {n for names in pointers.values() if len(names) > 1 and set(names) - missing for n in names}
        if missing and missing <= tied:
            load_result = type(load_result)([], list(load_result.unexpected_keys))
        super()._issue_warnings_after_load(load_result)

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # Resumed from a checkpoint taken at the last step, transformers would still take one step more (its
        # loop checks for the end only after a step): nothing is left to train.
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # Write into a staging directory, then rename it into place: whenever the process is killed, a
        # checkpoint-N directory is either complete or absent.
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging_root = os.path.join(run_dir, f"{STAGING_PREFIX}{name}")
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.lmflow_plugins.hook.on_checkpoint_save(
            config=self.lmflow_config,
            checkpoint_dir=os.path.join(staging_root, name),
            is_main_process=self.args.should_save,
        )
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            fsync_tree(os.path.join(staging_root, name))
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging_root, name), final)
            shutil.rmtree(staging_root, ignore_errors=True)
            fsync_dir(run_dir)
            rotate_checkpoints(Path(run_dir), self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


class HookCallback(TrainerCallback):
    """Calls the ``on_step`` hook after every optimizer step."""

    def __init__(self, config: RunConfig, run_plugins: RunPlugins) -> None:
        self.config = config
        self.run_plugins = run_plugins
        self.trainer: LmflowTrainer | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loss = None
        if self.trainer is not None:
            loss, self.trainer.lmflow_step_loss = self.trainer.lmflow_step_loss, None
        record = self.trainer.lmflow_record if self.trainer is not None else None
        # What a plugin writes into the output directory here (a metrics file...) is the run's.
        watch = nullcontext()
        if record is not None and state.is_world_process_zero:
            watch = record.outputs.watch(on_new=lambda: record.write(status="running"))
        with watch:
            self._on_step(args, state, loss, kwargs)

    def _on_step(self, args: Any, state: Any, loss: Any, kwargs: dict[str, Any]) -> None:
        self.run_plugins.hook.on_step(
            config=self.config,
            step=StepContext(
                global_step=state.global_step,
                max_steps=state.max_steps,
                epoch=float(state.epoch or 0.0),
                loss_tensor=loss,
                model=kwargs.get("model"),
                optimizer=kwargs.get("optimizer"),
                lr_scheduler=kwargs.get("lr_scheduler"),
                output_dir=args.output_dir,
                is_main_process=state.is_world_process_zero,
            ),
        )


# --------------------------------------------------------------------------------------------------------------
# After training
# --------------------------------------------------------------------------------------------------------------


def _save_final(trainer: Any, tokenizer: Any, output_dir: Path, record: _RunRecorder) -> None:
    """Save the model and tokenizer: into a staging directory, then each file moved into place.

    The run record lists the files before they are moved, so a run killed half-way through still owns them.
    """
    staging = output_dir / FINAL_STAGING
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(staging))
        fsync_tree(str(staging))
        items = sorted(staging.iterdir())
        clash = [
            i.name for i in items if (output_dir / i.name).exists() and i.name not in record.outputs.names
        ]
        if clash:  # a user's file put beside a resumed run, with a name the save uses: never replaced
            raise LmflowError(
                f"the final model is saved in {staging} but not moved into {output_dir}: "
                f"{', '.join(clash)} there {'is' if len(clash) == 1 else 'are'} not lmflow's",
                f"move {'it' if len(clash) == 1 else 'them'} out of {output_dir} and run again with --resume",
            )
        record.outputs.add(item.name for item in items)
        record.write(status="running")
        for item in items:
            target = output_dir / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
        staging.rmdir()
        fsync_dir(str(output_dir))
    trainer.accelerator.wait_for_everyone()


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


class _RunRecorder:
    """Writes ``lmflow_run.json`` and ``run_config.yaml`` (main process only, atomically).

    The record says the directory is an lmflow run, which template and block size later commands use, and
    which entries the run wrote (``outputs``: all that ``--overwrite`` may delete). ``run_config.yaml`` holds
    the settings that define the run, so ``lmflow run --config out/run_config.yaml --output-dir other`` repeats
    it (how this run was started, ``--resume``/``--overwrite``, is left out).
    """

    def __init__(
        self,
        output_dir: Path,
        config: RunConfig,
        run_plugins: RunPlugins,
        template: str | None,
        block_size: int,
        outputs: OutputTracker,
    ) -> None:
        self.output_dir, self.config, self.run_plugins = output_dir, config, run_plugins
        self.template, self.block_size, self.outputs = template, block_size, outputs
        if "tensorboard" in config.report_to.split(","):
            outputs.add(["runs"])  # transformers' TensorBoard logs go to <output_dir>/runs

    def write(self, status: str, result: RunResult | None = None) -> None:
        if not _is_main_process():
            return
        import yaml

        self.output_dir.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in self.config.to_dict().items() if k not in ("resume", "overwrite")}
        record = {
            "lmflow_version": __version__,
            "status": status,
            "template": self.template,
            "block_size": self.block_size,
            "plugins": self.run_plugins.versions(),
            "config": settings,
            "outputs": self.outputs.listed(),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if result is not None:
            record["result"] = result.to_dict()
        atomic_write(self.output_dir / RUN_RECORD, json.dumps(record, indent=2, default=_json_default) + "\n")
        atomic_write(self.output_dir / RUN_CONFIG, yaml.safe_dump(settings, sort_keys=False))


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


__all__ = ["RunResult", "StepContext", "configure", "execute", "format_duration", "run"]
