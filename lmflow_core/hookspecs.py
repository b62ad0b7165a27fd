"""Every hook a plugin can implement, grouped by the phase of a run in which it is called.

A plugin is a module (or any object) whose functions are marked with :data:`lmflow_core.hookimpl` and named
after a hook below. A hook implementation may accept any subset of the hook's arguments, by name. A marked
function whose name is not a hook here is an error when the plugin is loaded (no silent typos).

Two kinds of hooks:

* **Catalog hooks** (``register_templates``, ``register_commands``) are called on *every installed* plugin:
  templates and commands are available without selecting the plugin that provides them.
* **Run hooks** (all the others) are called only on the plugins a run selects with ``--plugins``, plus the
  core's own defaults, which are ``trylast`` implementations that a plugin overrides by returning a value.

How results combine is stated per hook: *first result* (``firstresult``: the first plugin returning
something other than ``None`` wins, the core default answers last), *all* (a list with every plugin's
non-``None`` result), or *fold* (each plugin receives what the previous one returned; ``None`` keeps it).
Plugins are called in the order they are named in ``--plugins`` (``tryfirst``/``trylast`` aside), the core's
defaults last.
Set ``LMFLOW_TRACE_HOOKS=1`` to print every hook call and which plugins answered it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import click
    import datasets
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

    from .config import RunConfig
    from .generate import GenerationOptions
    from .options import PluginOption
    from .templates import Conversation, Segment, Template

PROJECT = "lmflow"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# How the core calls each hook that pluggy's own loop does not combine. Fold hooks pass a value from one plugin
# to the next (lmflow_core.plugins.fold); per-plugin hooks keep each plugin's result apart, to merge or check
# them (lmflow_core.plugins.call_each). The core calls their implementations one at a time, so a wrapper
# (``hookimpl(wrapper=True)``) cannot run around them: it is refused when the plugin is registered. Every other
# hook is called by pluggy (first result or all results) and supports wrappers.
FOLD_HOOKS = frozenset({"prepare_model", "prepare_dataset", "wrap_optimizer"})
PER_PLUGIN_HOOKS = frozenset(
    {"declare_options", "declare_conflicts", "demo_settings", "model_init_kwargs", "evaluate"}
)


@dataclass
class StepContext:
    """What the ``on_step`` hook receives after each optimizer step.

    ``loss`` is this process's training loss of the step just taken (averaged over its gradient-accumulation
    micro-batches); it is read from the device only when a plugin asks for it.
    """

    global_step: int
    max_steps: int
    epoch: float
    model: Any
    optimizer: Any
    lr_scheduler: Any
    output_dir: str
    is_main_process: bool
    loss_tensor: Any = None

    @property
    def loss(self) -> float | None:
        return None if self.loss_tensor is None else float(self.loss_tensor)


# --------------------------------------------------------------------------------------------------------------
# Catalog: called on every installed plugin
# --------------------------------------------------------------------------------------------------------------


@hookspec
def register_templates() -> list[Template]:
    """Contribute conversation templates to the registry.

    When: whenever a template is looked up by name or listed (``--template``, ``lmflow templates``), on every
    installed plugin, selected or not.

    Returns: a list of :class:`lmflow_core.Template` objects.

    Combine: all; the lists are concatenated. Two templates with the same name are an error naming both
    plugins.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``lmflow`` command line.

    When: once at CLI start-up, on every installed plugin. Keep the plugin module's imports light: heavy
    libraries belong inside the command's function. Every command added gets the core's ``--debug``.

    Args:
        cli: the top-level click group; call ``cli.add_command(...)`` or use ``@cli.command()``.

    Combine: all; return values are ignored.
    """


# --------------------------------------------------------------------------------------------------------------
# Configuration: called before anything heavy is loaded
# --------------------------------------------------------------------------------------------------------------


@hookspec
def declare_options() -> list[PluginOption]:
    """Declare this plugin's options.

    When: when a run is configured with the plugin selected, and for ``lmflow run --plugins X --help``.
    Each option becomes a ``lmflow run`` flag (``--<plugin>-<name>`` unless the option names its own flag) and
    a key in the plugin's section of the YAML config; values are validated (type, choices, range) before any
    model loads and reach the plugin as ``config.options_for("<plugin>")``.

    Returns: a list of :class:`lmflow_core.PluginOption`.

    Combine: per plugin; each plugin's list is kept under its own name.
    """


@hookspec
def declare_conflicts() -> dict[str, str]:
    """Name the plugins this plugin cannot run with.

    When: when plugins are selected, before anything else.

    Returns: ``{other_plugin_name: reason}``. Selecting both is an error that names both plugins and gives
    the reason; either plugin may declare the conflict.

    Combine: per plugin.
    """


@hookspec
def demo_settings(given: dict[str, Any]) -> dict[str, Any] | None:
    """Settings of this plugin's own demo, for ``lmflow run --plugins NAME`` with no model and no dataset.

    When: when a run is configured without ``--model`` and ``--dataset``, on the selected plugins, before the
    configuration is built. The result is the lowest-precedence layer, over the core's demo (the bundled
    model and conversations): any flag the user gave still wins.

    Args:
        given: the settings the user gave (flags, config file, ``run()`` keywords), to leave alone.

    Returns: run settings (``model``, ``dataset``, ``eval_dataset``, ``template``, schedule, plugin options by
    plugin name), or ``None`` to keep the core's demo.

    Combine: all; the dicts are merged in plugin order. Two plugins setting one setting differently is an
    error naming both plugins.
    """


@hookspec
def validate_config(config: RunConfig, model_config: PretrainedConfig) -> list[str] | None:
    """Check the run configuration for problems that only this plugin knows about.

    When: in every command that loads a model, once the model's configuration is read and before anything
    else of the model (``configure_model`` comes next); in a run that is before the data is read. The core's
    own checks ran already.

    Args:
        config: the resolved run configuration (``config.options_for(name)`` for plugin options).
        model_config: the model's ``PretrainedConfig`` as read (an adapter's base), to check options against
            the architecture (layer counts, module names...). Do not change it here.

    Returns: a list of problems, each a sentence naming the bad value and the fix; ``None`` or ``[]`` if
    all is well. Do not raise: returning lets every problem of every plugin be reported at once.

    Combine: all; every problem is reported in one error and the run stops.
    """


# --------------------------------------------------------------------------------------------------------------
# Model: tokenizer, model configuration, weights, and wrapping
#
# Every command that loads a model (run, generate, chat, serve, evaluate, merge-lora; open_session and
# load_pretrained in Python) calls the four loading hooks in one order, through lmflow_core.loading:
# configure_model, load_tokenizer, model_init_kwargs, load_model. For a PEFT adapter directory they load its base
# (``config.model`` names the base) and the core applies the adapter to what load_model returned.
# prepare_model is training only; prepare_inference adjusts a model loaded for inference.
# --------------------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def load_tokenizer(config: RunConfig) -> PreTrainedTokenizerBase | None:
    """Load the tokenizer for the run.

    When: in every command that loads a model, after ``configure_model``; in a run before data is tokenized.
    The core default loads ``config.tokenizer`` (or the model's) with ``AutoTokenizer`` and gives it a pad
    token if it has none. For an adapter directory ``config.tokenizer`` is the adapter's tokenizer when it has
    one.

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.

    Returns: a tokenizer, or ``None`` to let the next plugin (finally the core) load it.

    Combine: first result.
    """


@hookspec
def configure_model(config: RunConfig, model_config: PretrainedConfig) -> None:
    """Change the model's ``PretrainedConfig`` before its weights are loaded.

    When: in every command that loads a model, first: after the configuration is read from the model
    directory or hub, before ``load_tokenizer`` and ``load_model``. Changes made here are saved with the output
    model (e.g. RoPE scaling, attention implementation).

    Args:
        config: the run configuration.
        model_config: the transformers config object; modify it in place.

    ``configure_model`` describes *what* the model is (fields of its ``PretrainedConfig``, saved with it);
    ``model_init_kwargs`` says *how* to load it (``from_pretrained`` arguments such as ``quantization_config``,
    ``device_map`` or ``attn_implementation``, which are not saved as architecture). They stay two hooks
    because the second's results are merged across plugins, with two plugins setting one argument differently
    reported as a conflict, which an in-place change of the config cannot detect. Check options in
    ``validate_config``, not here, so that every problem is reported at once.

    Combine: all; return values are ignored.
    """


@hookspec
def model_init_kwargs(config: RunConfig) -> dict[str, Any] | None:
    """Contribute keyword arguments for ``from_pretrained`` / ``from_config``.

    When: in every command that loads a model, just before ``load_model``. Use it for
    ``attn_implementation``, ``quantization_config``, ``device_map`` and the like. In the inference commands
    ``config.model_dtype`` is the ``--dtype`` chosen (``auto`` resolved).

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.

    Returns: a dict of keyword arguments, or ``None``. (Why this is not part of ``configure_model``: see
    there.)

    Combine: all; the dicts are merged. Two plugins setting the same key to different values is an error
    naming both plugins.
    """


@hookspec(firstresult=True)
def load_model(
    config: RunConfig, model_config: PretrainedConfig, init_kwargs: dict[str, Any]
) -> PreTrainedModel | None:
    """Create the model.

    When: in every command that loads a model, after ``configure_model`` and ``model_init_kwargs``. The core
    default calls ``AutoModelForCausalLM.from_pretrained`` (or ``from_config`` with a seeded random
    initialisation when ``config.random_init`` is set). The bundled demo loads its saved, seeded initial
    weights like any model. For a PEFT adapter directory ``config.model`` is its base, and the core puts the
    adapter on the model returned here; an inference command then moves the model to its device (unless it
    has an ``hf_device_map``) and puts it in eval mode.

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.
        model_config: the transformers ``PretrainedConfig`` the model is built from.
        init_kwargs: keyword arguments merged from ``model_init_kwargs`` (``dtype`` is set by the core).

    Returns: a model, or ``None`` to let the next plugin (finally the core) load it.

    Combine: first result.
    """


@hookspec
def prepare_model(
    config: RunConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel | None:
    """Transform the loaded model before training: wrap it in adapters, freeze layers, resize embeddings.

    When: after ``load_model``, before the trainer is built; ``lmflow run`` only (a model loaded for inference
    is adjusted in ``prepare_inference``).

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.
        model: the model (a ``PreTrainedModel``, or the wrapper a plugin returned, e.g. a ``PeftModel``).
        tokenizer: the run's tokenizer.

    Returns: the model to use from now on (e.g. a ``PeftModel``), or ``None`` when the model was changed in
    place.

    Combine: fold; each plugin receives the model returned by the previous one.
    """


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def normalize_record(
    config: RunConfig, record: Any, declared_type: str | None, where: str, data_file: Path | None
) -> tuple[str, dict[str, Any]] | None:
    """Accept a dataset record in a shape the core does not know (e.g. images next to the messages).

    When: for every record of every dataset, before the core's own checks.

    Args:
        config: the run's (or the command's) :class:`lmflow_core.RunConfig`.
        record: the record as read from the file (usually a dict).
        declared_type: the file's ``"type"`` (LMFlow format), or ``None`` for .jsonl files and JSON lists.
        where: the file and index of the record, for error messages.
        data_file: the file the record was read from, to resolve paths relative to it (``None`` for a row of
            a hub dataset).

    Returns: ``(type, normalised_record)`` with ``type`` one of ``text_only``, ``text2text``,
    ``conversation`` and the record holding that type's fields (``{"text"}``, ``{"input", "output"}``,
    ``{"system", "messages"}``); any other keys are kept as dataset columns next to ``input_ids`` and
    ``labels`` (for a plugin's collator). ``None`` lets the core handle the record. Raise
    :class:`lmflow_core.DataError` naming ``where`` for a malformed record.

    Combine: first result.
    """


@hookspec(firstresult=True)
def format_conversation(
    config: RunConfig,
    template: Template,
    conversation: Conversation,
    add_generation_prompt: bool,
    tokenizer: PreTrainedTokenizerBase | None,
) -> list[Segment] | None:
    """Render a conversation as text segments, each marked as trained (carries the loss) or not.

    When: for every conversation record during data preparation, and to build the prompt for generation
    (with ``add_generation_prompt=True``). Training and inference go through this one hook, so their formats
    cannot drift apart. The core default calls ``template.render(...)``.

    Args:
        config: the run's (or the inference session's) :class:`lmflow_core.RunConfig`.
        template: the selected :class:`lmflow_core.Template`.
        conversation: the system prompt and messages.
        add_generation_prompt: append the header that starts the assistant's next turn.
        tokenizer: the run's tokenizer, for templates that use its special tokens (may be ``None``).

    Returns: a list of :class:`lmflow_core.Segment`, or ``None`` to defer.

    Combine: first result.
    """


@hookspec
def prepare_dataset(
    config: RunConfig, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, split: str
) -> datasets.Dataset | None:
    """Transform a tokenized dataset (columns ``input_ids``, ``labels``, ``attention_mask``).

    When: after tokenization and truncation, for ``split`` = ``"train"`` and ``"eval"``. Use it for packing,
    filtering by length, or adding columns a custom collator needs.

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.
        dataset: a tokenized ``datasets.Dataset`` (``input_ids``, ``labels``, ``attention_mask``).
        tokenizer: the run's tokenizer.
        split: ``"train"`` or ``"eval"``.

    Returns: the dataset to use from now on, or ``None`` to keep it.

    Combine: fold.
    """


@hookspec(firstresult=True)
def data_collator(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
    """Provide the function that turns a list of examples into a batch.

    When: when the trainer is built. The core default pads ``input_ids`` with the pad token and ``labels``
    with -100 (``DataCollatorForSeq2Seq``); with ``--packing`` it is
    :class:`lmflow_core.data.packing.PackedCollator`, which keeps packed rows' ``position_ids`` and sends no
    attention mask. A plugin replacing it under ``--packing`` must do the same.

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.
        tokenizer: the run's tokenizer.

    Returns: a callable, or ``None`` to defer.

    Combine: first result.
    """


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


@hookspec
def adjust_training_args(config: RunConfig, training_args: dict[str, Any]) -> None:
    """Change the keyword arguments of ``transformers.TrainingArguments`` before it is built.

    When: after the model is prepared, before the trainer is built. The dict already holds every value the
    core derives from the run config (batch sizes, precision, schedule, checkpointing). Use it for DeepSpeed
    or FSDP configs, optimizer choice, and similar.

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.
        training_args: the keyword arguments; modify in place.

    Combine: all; plugins see each other's changes in call order. Return values are ignored.
    """


@hookspec
def trainer_callbacks(config: RunConfig) -> list[TrainerCallback] | None:
    """Contribute ``transformers.TrainerCallback`` objects to the trainer.

    When: when the trainer is built.

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.

    Returns: a list of callbacks, or ``None``.

    Combine: all; the lists are concatenated.
    """


@hookspec
def wrap_optimizer(
    config: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> torch.optim.Optimizer | None:
    """Replace or wrap the optimizer the trainer created.

    When: once, when the trainer creates its optimizer (before the first step, and before a checkpoint's
    optimizer state is loaded on resume).

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.
        model: the model (a ``PreTrainedModel``, or the wrapper a plugin returned, e.g. a ``PeftModel``).
        optimizer: the optimizer the trainer created (or the previous plugin's replacement).

    Returns: the optimizer to use, or ``None`` to keep it.

    Combine: fold.
    """


@hookspec(firstresult=True)
def compute_loss(
    config: RunConfig, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]] | None:
    """Compute the loss of a batch: a training objective other than the language-modelling loss.

    When: for every batch the trainer computes a loss on, in training (``model.training`` is true) and in
    evaluation during the run (``--eval-steps``). The core default returns ``None``: the trainer's own loss
    (the model's cross-entropy on ``labels``). A plugin that answers owns the loss of every batch: the core then
    neither divides it by the gradient-accumulation steps itself (return the mean over the batch; the core
    divides) nor asks the model for its loss.

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.
        model: the model being trained (possibly wrapped: ``PeftModel``, DeepSpeed or DDP engine).
        inputs: the batch from the data collator (for preference pairs: the chosen answers in the first half
            of ``input_ids``/``labels``/``attention_mask``, the rejected ones in the second half).
        num_items_in_batch: the number of trained tokens in the optimizer step's batches (may be ``None``).

    Returns: the loss (a scalar tensor), or ``(loss, metrics)`` where ``metrics`` maps names to floats or
    scalar tensors; the core averages each metric over the batches between two log lines and logs it beside
    the loss (``eval_<name>`` in evaluation): the progress line, ``lmflow_run.json`` and the report_to
    integrations show it. ``None`` defers to the next plugin.

    Combine: first result.
    """


@hookspec
def on_step(config: RunConfig, step: StepContext) -> None:
    """Act after every optimizer step.

    When: at the end of each optimizer step (after gradient accumulation), on every process.

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.
        step: a :class:`lmflow_core.StepContext` with ``global_step``, ``max_steps``, ``epoch``,
            ``loss`` (this process's loss of the step), ``model``, ``optimizer``, ``lr_scheduler``,
            ``output_dir`` and ``is_main_process``.

    Combine: all; return values are ignored.
    """


@hookspec
def on_checkpoint_save(config: RunConfig, checkpoint_dir: str, is_main_process: bool) -> None:
    """Add this plugin's state to a checkpoint being written (e.g. which layers are active, RNG states).

    When: on every process, after the trainer has written the model, optimizer and trainer state of a
    checkpoint and before the checkpoint is moved into place. ``checkpoint_dir`` is still a staging directory:
    files written there become part of the checkpoint atomically, so a killed run never sees half of them.

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.
        checkpoint_dir: where to write; write from the main process unless the state differs per process.
        is_main_process: whether this process writes the shared files.

    Combine: all; return values are ignored.
    """


@hookspec
def on_checkpoint_load(config: RunConfig, checkpoint_dir: str) -> None:
    """Restore this plugin's state from the checkpoint a run resumes from.

    When: on every process, once, when ``--resume`` continues from ``checkpoint_dir``: after the model is
    prepared and the trainer built, before training (and the optimizer) starts.

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.
        checkpoint_dir: the checkpoint being resumed, as written by ``on_checkpoint_save``.

    Combine: all; return values are ignored.
    """


@hookspec
def on_train_end(
    config: RunConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: str
) -> None:
    """Act once training has finished and the final model is saved in ``output_dir``.

    When: after the final save, before evaluation and the run summary; on the main process only. Use it to
    write extra files next to the model.

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.
        model: the model (a ``PreTrainedModel``, or the wrapper a plugin returned, e.g. a ``PeftModel``).
        tokenizer: the run's tokenizer.
        output_dir: the output directory, holding the saved model and tokenizer.

    Combine: all; return values are ignored.
    """


# --------------------------------------------------------------------------------------------------------------
# Inference and evaluation
# --------------------------------------------------------------------------------------------------------------


@hookspec
def prepare_inference(config: RunConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Get ready to generate with a model loaded by an inference command (load a draft model, warm caches).

    When: once, after ``lmflow generate``, ``chat``, ``serve`` or ``evaluate`` (or the Python
    ``open_session``) has loaded the model through the loading hooks (and applied an adapter), before the
    first request; the place to adjust a model loaded for inference. State a plugin needs later belongs on
    the model object (e.g. ``model.lmflow_draft``), so that every loaded model has its own.

    Args:
        config: the settings of the session (``model``, ``template``, ``plugins``, plugin options).
        model: the loaded model.
        tokenizer: its tokenizer.

    Returns: nothing; raise :class:`lmflow_core.LmflowError` for a problem the user must fix.

    Combine: all; return values are ignored.
    """


@hookspec(firstresult=True)
def prompt_inputs(
    config: RunConfig | None,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversation: Conversation,
) -> dict[str, Any] | None:
    """Model inputs of a prompt beside its token ids: the pixel values of the images in the conversation.

    When: for every generation from a conversation (run samples, ``generate``, ``chat``, ``serve``, RAFT),
    after the prompt is rendered through ``format_conversation``. The core default returns ``None`` for a
    conversation without images and refuses one with images (a text model cannot read them).

    Args:
        config: the run's or the inference session's settings, or ``None``.
        model: the loaded model.
        tokenizer: its tokenizer.
        conversation: the conversation prompted; ``conversation.images`` holds its images (paths, ``data:``
            URLs or ``PIL.Image`` objects), one per :data:`lmflow_core.IMAGE_MARKER` in the messages.

    Returns: keyword arguments for the model's ``generate``/``forward`` (tensors, e.g. ``pixel_values``),
    which reach ``decode`` as ``inputs``; ``None`` to defer. Raise :class:`lmflow_core.LmflowError` for an
    image that cannot be read.

    Combine: first result.
    """


@hookspec(firstresult=True)
def decode(
    config: RunConfig | None,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    options: GenerationOptions,
    streamer: Any,
    inputs: dict[str, Any],
) -> torch.Tensor | None:
    """Generate tokens after a prompt.

    When: for every generation (run samples, and the inference commands). The core default calls
    ``model.generate`` with the options (greedy or sampling, stop strings, end-of-turn tokens). ``lmflow serve``
    batches concurrent requests with its own decoding loop while no plugin implements this hook; when one does,
    the server calls the hook for each request, one at a time.

    Args:
        config: the run's or the inference session's settings (plugin options), or ``None``.
        model: the model (a ``PreTrainedModel``, or the wrapper a plugin returned, e.g. a ``PeftModel``).
        tokenizer: the run's tokenizer.
        input_ids: the prompt, shape ``(1, prompt_length)``.
        options: a :class:`lmflow_core.GenerationOptions`; a decoder may put figures worth reporting
            in ``options.stats``.
        streamer: a transformers streamer receiving tokens as they are produced, or ``None``.
        inputs: other model inputs of the prompt from ``prompt_inputs`` (e.g. ``pixel_values``), on the
            model's device; empty for a text prompt. A decoder that cannot use them returns ``None``.

    Returns: the full sequences (prompt followed by the new tokens), or ``None`` to defer.

    Combine: first result.
    """


@hookspec
def evaluate(
    config: RunConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset | None,
) -> dict[str, float] | None:
    """Measure the model, on the tokenized evaluation dataset or on data of the plugin's own.

    When: at the end of every run, once the final model is saved, and in ``lmflow evaluate``. In a run without
    an evaluation dataset only the implementations that do not take ``dataset`` are called (those that score
    data of their own, such as ``lm_eval``'s); an implementation that takes ``dataset`` always gets one. The
    core default reports the negative log-likelihood of the trained tokens (``nll_per_sample``,
    ``nll_per_token``, ``perplexity``).

    Args:
        config: the run's :class:`lmflow_core.RunConfig`.
        model: the model (a ``PreTrainedModel``, or the wrapper a plugin returned, e.g. a ``PeftModel``).
        tokenizer: the run's tokenizer.
        dataset: a tokenized ``datasets.Dataset`` (``input_ids``, ``labels``, ``attention_mask``; for
            preference pairs also ``rejected_input_ids``, ``rejected_labels``, ``rejected_attention_mask``,
            which the core default does not score).

    Returns: a dict of metric name to value, or ``None``.

    Combine: all; the dicts are merged into one report (a later plugin's key does not overwrite an earlier
    one's: a duplicate metric name is an error).
    """
