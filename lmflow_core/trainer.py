"""The Trainer of a run: ``transformers.Trainer`` with lmflow's hooks and atomic checkpoints and final save.

:func:`training_arguments` builds the ``TrainingArguments`` of a run, :func:`build_trainer` the trainer;
:class:`LmflowTrainer` calls ``wrap_optimizer`` and writes every checkpoint atomically; :class:`HookCallback`
calls ``on_step``; :func:`save_final` moves the final model into place.
"""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from .errors import ConfigError, LmflowError
from .hookspecs import StepContext
from .models import accelerator_available
from .plugins import RunPlugins, fold
from .rundir import FINAL_STAGING, STAGING_PREFIX, fsync_dir, fsync_tree, rotate_checkpoints

if TYPE_CHECKING:
    from .config import RunConfig
    from .report import Reporter
    from .rundir import RunRecorder


def training_arguments(config: RunConfig, run_plugins: RunPlugins, has_eval: bool) -> TrainingArguments:
    """Build ``TrainingArguments`` before any model loads, so that bad settings fail early.

    Plugins adjust the keyword arguments first (``adjust_training_args``). Building the arguments this early
    is also what DeepSpeed ZeRO-3 needs to load a model already partitioned.
    """
    from transformers.integrations import get_reporting_integration_callbacks

    kwargs = training_kwargs(config, has_eval)
    run_plugins.hook.adjust_training_args(config=config, training_args=kwargs)
    try:
        args = TrainingArguments(**kwargs)
        get_reporting_integration_callbacks(args.report_to)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(
            f"invalid training settings: {str(exc).strip().splitlines()[0]}", "check the run options"
        ) from exc
    return args


def training_kwargs(config: RunConfig, has_eval: bool) -> dict[str, Any]:
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


def build_trainer(
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
    metric_names: set[str] = set()
    callbacks = [hook_callback, report.progress_callback(metric_names)]
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
        metric_names=metric_names,
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
    lmflow_record: RunRecorder | None = None

    def __init__(self, *args: Any, metric_names: set[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lmflow_metrics: dict[str, dict[str, list[Any]]] = {}
        # Names of the plugin metrics logged so far (shared with the progress line, which prints them).
        self.lmflow_metric_names = metric_names if metric_names is not None else set()

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        # The returned losses of one optimizer step's micro-batches add up to that step's loss.
        loss = super().training_step(*args, **kwargs)
        self.lmflow_step_loss = loss if self.lmflow_step_loss is None else self.lmflow_step_loss + loss
        return loss

    def plugin_loss(self) -> bool:
        """Whether a selected plugin computes the loss (the ``compute_loss`` hook)."""
        return bool(self.lmflow_plugins.hook.compute_loss.get_hookimpls())

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if not self.plugin_loss():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        result = self.lmflow_plugins.hook.compute_loss(
            config=self.lmflow_config, model=model, inputs=inputs, num_items_in_batch=num_items_in_batch
        )
        if result is None:  # every plugin deferred: transformers decides the scaling as for its own loss
            self.loss_is_scaled_for_ga = None
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The plugin returns the batch's mean loss: transformers divides it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        loss, metrics = result if isinstance(result, tuple) else (result, {})
        split = "train" if model.training else "eval"
        bucket = self.lmflow_metrics.setdefault(split, {})
        for name, value in (metrics or {}).items():
            bucket.setdefault(name, []).append(value.detach() if hasattr(value, "detach") else value)
        return (loss, None) if return_outputs else loss

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> Any:
        if not self.plugin_loss():
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        import torch

        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # A plugin loss's metrics, averaged since the last log line, are logged beside the loss.
        split, prefix = ("eval", "eval_") if "eval_loss" in logs else ("train", "")
        if "loss" in logs or "eval_loss" in logs:
            for name, values in self.lmflow_metrics.pop(split, {}).items():
                total = sum(float(v) for v in values)
                logs[f"{prefix}{name}"] = round(total / len(values), 6)
                self.lmflow_metric_names.add(name)
        super().log(logs, *args, **kwargs)

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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = model if model is not None else self.model
        if (
            self.is_deepspeed_enabled
            or self.is_fsdp_enabled
            or not load_renamed(target, resume_from_checkpoint)
        ):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # Tied weights (an LM head sharing the embedding matrix) are saved once; their absence is expected.
        missing = set(load_result.missing_keys)
        tied = {n for names in tied_groups(self.model) if set(names) - missing for n in names}
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


def save_final(trainer: Any, tokenizer: Any, output_dir: Path, record: RunRecorder) -> None:
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


def load_renamed(model: Any, checkpoint_dir: str) -> bool:
    """Load a checkpoint's ``model.safetensors`` whose weights ``save_pretrained`` renamed; whether it did.

    transformers saves some architectures under their legacy weight names (LLaVA: ``language_model.model.*``
    for ``model.language_model.*``) and renames them back in ``from_pretrained``, but its Trainer reloads a
    checkpoint with a plain ``load_state_dict``: every weight missed, the run silently resumed from the
    starting weights. The names are matched here as ``save_pretrained`` writes them. Returns ``False`` (the
    Trainer's own loading applies) for a checkpoint without renamed weights, sharded or converted ones.
    """
    from pathlib import Path

    from transformers import PreTrainedModel

    path = Path(checkpoint_dir) / "model.safetensors"
    if not isinstance(model, PreTrainedModel) or not path.is_file():
        return False
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return False
    own = model.state_dict()
    saved = revert_weight_conversion(model, dict(own))
    if list(saved) == list(own) or len(saved) != len(own):
        return False
    by_storage: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, tensor in own.items():
        by_storage.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    names: dict[str, list[str]] = {}
    for saved_name, tensor in saved.items():
        found = by_storage.get((tensor.data_ptr(), tuple(tensor.shape)))
        if not found:
            return False  # a weight converted (merged, split), not only renamed
        names[saved_name] = found  # tied weights share one storage: each of their names
    from safetensors.torch import load_file

    weights = load_file(str(path))
    if any(key not in names for key in weights):
        return False
    state = {name: value for key, value in weights.items() for name in names[key]}
    result = model.load_state_dict(state, strict=False)
    tied = {n for group in tied_groups(model) for n in group}
    if set(result.missing_keys) - tied:
        raise RuntimeError(
            f"checkpoint {checkpoint_dir} lacks weights: {sorted(set(result.missing_keys) - tied)[:5]}"
        )
    return True


def tied_groups(model: Any) -> list[list[str]]:
    """The names of each group of parameters sharing one storage (an LM head tied to the embeddings), which a
    checkpoint saves once."""
    pointers: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        pointers.setdefault(parameter.data_ptr(), []).append(name)
    return [names for names in pointers.values() if len(names) > 1]
