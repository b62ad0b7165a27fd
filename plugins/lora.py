"""LoRA, DoRA and QLoRA fine-tuning through peft (plugin ``lora``; Hu et al., arXiv 2106.09685).

The base model is frozen and small low-rank matrices are trained next to its linear layers (by default every
linear layer of the decoder blocks, peft's ``all-linear``). The run's output directory is a peft adapter
directory: ``PeftModel.from_pretrained(base, output)`` loads it, and ``lmflow generate/chat/serve/evaluate``
accept it directly (the base loads through the loading hooks, then the adapter); ``lmflow merge-lora`` folds the
adapter into a plain model directory, its base loaded the same way (``--plugins`` adds plugins' loaders).

    lmflow run --model M --dataset D --plugins lora --lora-rank 16
    lmflow merge-lora --adapter output --output merged

* ``--lora-dora``: DoRA (Liu et al., arXiv 2402.09353), peft's ``use_dora``.
* ``--lora-qlora``: the base model is loaded in 4 bits (NF4, bitsandbytes) and prepared with
  ``peft.prepare_model_for_kbit_training`` (Dettmers et al., arXiv 2305.14314); needs a CUDA GPU.

Everything a user can get wrong (a target module name that matches no module, QLoRA without a GPU, LoRA on a
model without saved weights) is reported before the model's weights are loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmflow_core import (
    ADAPTER_CONFIG,
    RUN_RECORD,
    ConfigError,
    LmflowError,
    PluginOption,
    adapter_base,
    check_output_apart,
    check_replaceable,
    hookimpl,
    is_adapter,
    load_model_config,
    load_pretrained,
    model_source,
    move_into_place,
    quiet_libraries,
    read_json,
    write_output_record,
)

if TYPE_CHECKING:
    import click

    from lmflow_core import RunConfig

NAME = "lora"
ALL_LINEAR = "all-linear"
ADAPTER_NAME = "default"
MERGE_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Files of a model's processor an adapter directory may hold beside the tokenizer (multimodal runs save them);
#: a merged model gets them too, the adapter's chat template last.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.jinja")


@hookimpl
def declare_options() -> list[PluginOption]:
    """The ``--lora-*`` flags (``lora:`` section of a YAML run config)."""
    return [
        PluginOption("rank", int, 8, "Rank r of the low-rank update matrices.", min=1),
        PluginOption("alpha", int, 16, "Scaling numerator: the update is multiplied by alpha / rank.", min=1),
        PluginOption("dropout", float, 0.05, "Dropout on the LoRA branch's input, in [0, 1)."),
        PluginOption(
            "target_modules",
            str,
            ALL_LINEAR,
            "Modules that get adapters: comma-separated names (e.g. q_proj,v_proj), or all-linear for every "
            "linear layer of the blocks.",
        ),
        PluginOption(
            "modules_to_save",
            str,
            None,
            "Modules trained in full and saved with the adapter, comma-separated (e.g. lm_head,embed_tokens).",
        ),
        PluginOption("dora", bool, False, "Weight-decomposed LoRA (DoRA)."),
        PluginOption(
            "qlora", bool, False, "Load the base model in 4 bits (NF4, bitsandbytes); needs a CUDA GPU."
        ),
    ]


# --------------------------------------------------------------------------------------------------------------
# Checks, before anything loads
# --------------------------------------------------------------------------------------------------------------


def parse_names(value: str | None) -> list[str]:
    """``"q_proj, v_proj"`` -> ``["q_proj", "v_proj"]``; ``None`` or blanks -> ``[]``."""
    return [name.strip() for name in (value or "").split(",") if name.strip()]


def target_modules(value: str) -> str | list[str]:
    """The ``target_modules`` peft receives: ``"all-linear"`` or a list of module names."""
    names = parse_names(value)
    return ALL_LINEAR if [n.lower() for n in names] == [ALL_LINEAR] else names


@hookimpl
def validate_config(config: RunConfig, model_config: Any) -> list[str]:
    """Problems with the options, the model and the machine, found before any weight loads.

    The module names are checked against the architecture built without weights (on the meta device).
    """
    options = config.options_for(NAME)
    problems = []
    if config.model and is_adapter(config.model):
        # (An inference command sees an adapter's base here: only a run can be handed an adapter.)
        problems.append(
            f"--model {config.model} is a LoRA adapter, not a model; merge it first (lmflow merge-lora "
            f"--adapter {config.model} --output MERGED) and pass --model MERGED"
        )
    if not 0 <= options.dropout < 1:
        problems.append(
            f"--lora-dropout must be a probability in [0, 1), got {options.dropout:g}; use e.g. 0.05 (or 0 for none)"
        )
    names = parse_names(options.target_modules)
    names_ok = False
    if not names:
        problems.append(
            "--lora-target-modules is empty; pass module names (e.g. q_proj,v_proj) or all-linear"
        )
    elif ALL_LINEAR in [n.lower() for n in names] and len(names) > 1:
        problems.append(
            "--lora-target-modules: all-linear already takes every linear layer; pass it alone or list names"
        )
    else:
        names_ok = True
    if config.random_init:
        problems.append(
            "LoRA needs a base model with saved weights to reload the adapter onto, and --random-init builds a "
            "randomly initialised model; pass --model with a saved model directory (or drop --random-init)"
        )
    if options.qlora:
        problems.extend(_qlora_problems())
    if names_ok and model_config is not None:
        problems.extend(_module_name_problems(config, options, model_config))
    return problems


def _qlora_problems() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return [
            "--lora-qlora needs a CUDA GPU (bitsandbytes 4-bit training) and none is available; drop --lora-qlora"
        ]
    if not bitsandbytes_installed():
        return [
            "--lora-qlora needs bitsandbytes, which is not installed; install it with `pip install bitsandbytes`"
        ]
    return []


def bitsandbytes_installed() -> bool:
    """Whether bitsandbytes can be imported (QLoRA's 4-bit layers)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def _module_name_problems(config: RunConfig, options: Any, model_config: Any) -> list[str]:
    if target_modules(options.target_modules) == ALL_LINEAR and not options.modules_to_save:
        return []  # nothing named, nothing to check
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(
                copy.deepcopy(model_config), trust_remote_code=config.trust_remote_code
            )
    except Exception:  # an architecture that cannot be built empty: the names are checked once it loads
        return []
    return module_name_problems(skeleton, options)


def check_module_names(model: Any, options: Any) -> None:
    """Raise :class:`ConfigError` for a target or saved module name that matches no module of ``model``."""
    problems = module_name_problems(model, options)
    if problems:
        raise ConfigError.collect(problems)


def module_name_problems(model: Any, options: Any) -> list[str]:
    """A problem for each option whose module names match no module of ``model``."""
    problems = []
    keys = [name for name, _ in model.named_modules() if name]

    def matches(name: str) -> bool:
        return any(key == name or key.endswith("." + name) for key in keys)

    targets = target_modules(options.target_modules)
    if targets != ALL_LINEAR:
        missing = [name for name in targets if not matches(name)]
        if missing:
            problems.append(
                f"--lora-target-modules: {', '.join(repr(m) for m in missing)} "
                f"match{'es' if len(missing) == 1 else ''} no module of the model; use names of its linear "
                f"layers ({', '.join(linear_layer_names(model))}) or all-linear"
            )
    missing = [name for name in parse_names(options.modules_to_save) if not matches(name)]
    if missing:
        embeddings = [
            key
            for key, module in model.named_modules()
            if key and module in (model.get_input_embeddings(), model.get_output_embeddings())
        ]
        problems.append(
            f"--lora-modules-to-save: {', '.join(repr(m) for m in missing)} "
            f"match{'es' if len(missing) == 1 else ''} no module of the model; use module names of the model, "
            f"such as {', '.join(k.rsplit('.', 1)[-1] for k in embeddings)}"
        )
    return problems


def linear_layer_names(model: Any) -> list[str]:
    """The distinct short names of the linear layers that ``all-linear`` targets (e.g. q_proj, v_proj...)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names: dict[str, None] = {}
    for key, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head:
            names[key.rsplit(".", 1)[-1]] = None
    return list(names)


# --------------------------------------------------------------------------------------------------------------
# Loading and wrapping the model
# --------------------------------------------------------------------------------------------------------------


@hookimpl
def model_init_kwargs(config: RunConfig) -> dict[str, Any] | None:
    """QLoRA: load the base model's linear layers in 4-bit NF4 (bitsandbytes), on this process's GPU."""
    if not config.options_for(NAME).qlora:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        ),
        # A quantized model is placed when it loads: each process on its own GPU.
        "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))},
    }


def lora_config(options: Any, model: Any = None, train_projector: bool = False) -> Any:
    """The ``peft.LoraConfig`` of the run's options.

    On a vision-language model (one with a ``language_model``, under ``--plugins multimodal``) ``all-linear``
    means the language model's linear layers only, and the projector is trained and saved in full when
    ``train_projector``.
    """
    from peft import LoraConfig, TaskType

    saved = parse_names(options.modules_to_save)
    targets = target_modules(options.target_modules)
    if model is not None:
        language = language_model_targets(model)
        if language is not None and targets == ALL_LINEAR:
            targets = language
        if language is not None and train_projector:
            saved += [name for name in projector_names(model) if name not in saved]
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
        modules_to_save=saved or None,
        use_dora=options.dora,
    )


def language_model_targets(model: Any) -> str | None:
    """A vision-language model's ``all-linear``: a pattern of its language model's linear layers (peft matches
    it against full module names); ``None`` for a model without a ``language_model``."""
    import torch

    names = {
        key.rsplit(".", 1)[-1]
        for key, module in model.named_modules()
        if ".language_model." in f".{key}" and isinstance(module, torch.nn.Linear)
    }
    if not names:
        return None
    return rf"^(?:.*\.)?language_model\..*\.(?:{'|'.join(sorted(names))})$"


def projector_names(model: Any) -> list[str]:
    """The short module names of a vision-language model's projector (LLaVA's, Qwen2-VL's merger)."""
    found = []
    for key, _ in model.named_modules():
        short = key.rsplit(".", 1)[-1]
        if short in ("multi_modal_projector", "merger") and short not in found:
            found.append(short)
    return found


def base_reference(model: str) -> str:
    """How the adapter names its base: a local directory as an absolute path (valid from any directory), a hub
    id as it is."""
    local = Path(model).expanduser()
    return str(local.resolve()) if local.is_dir() else model


@hookimpl
def prepare_model(config: RunConfig, model: Any, tokenizer: Any) -> Any:
    """Freeze the base model and wrap it with LoRA adapters (``peft.get_peft_model``)."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    options = config.options_for(NAME)
    check_module_names(model, options)
    if options.qlora:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    # The adapters' random initialisation is a function of --seed, whatever ran before in this process.
    set_seed(config.seed)
    train_projector = "multimodal" in config.plugins and config.options_for("multimodal").train_projector
    peft_model = get_peft_model(
        model, lora_config(options, model, train_projector)
    )  # notice: quiet_libraries
    # get_peft_model names the base as the model reports it; name what the user gave, resolved.
    peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path = base_reference(model_source(config))
    return peft_model


@hookimpl
def on_checkpoint_load(config: RunConfig, checkpoint_dir: str) -> None:
    """Refuse to resume from a checkpoint that holds no adapter, or one trained with other LoRA settings."""
    saved = read_json(Path(checkpoint_dir) / ADAPTER_CONFIG)
    if not saved:
        raise LmflowError(
            f"checkpoint {checkpoint_dir} holds no LoRA adapter ({ADAPTER_CONFIG}): it was not written by a LoRA run",
            "resume without --plugins lora, or start a new run",
        )
    options = config.options_for(NAME)
    wanted = {"r": options.rank, "lora_alpha": options.alpha, "use_dora": options.dora}
    found = {key: saved.get(key) for key in wanted}
    if found != wanted:
        raise LmflowError(
            f"checkpoint {checkpoint_dir} was trained with other LoRA settings (rank {found['r']}, alpha "
            f"{found['lora_alpha']}, DoRA {'on' if found['use_dora'] else 'off'})",
            "resume with the --lora-* options the checkpoint was trained with",
        )
    # Other modules would silently start from scratch while the checkpoint's extra weights are dropped.
    targets = target_modules(options.target_modules)
    saved_targets = saved.get("target_modules")
    saved_targets = {saved_targets} if isinstance(saved_targets, str) else set(saved_targets or [])
    saved_kept = set(saved.get("modules_to_save") or [])
    if (targets != ALL_LINEAR and set(targets) != saved_targets) or set(
        parse_names(options.modules_to_save)
    ) != saved_kept:
        raise LmflowError(
            f"checkpoint {checkpoint_dir} was trained with other LoRA modules (targets "
            f"{', '.join(sorted(saved_targets)) or 'none'}; modules to save {', '.join(sorted(saved_kept)) or 'none'})",
            "resume with the --lora-target-modules and --lora-modules-to-save the checkpoint was trained with",
        )


# --------------------------------------------------------------------------------------------------------------
# Merging an adapter into its base model
# --------------------------------------------------------------------------------------------------------------


def merge_lora(
    base: str | os.PathLike | None,
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    plugins: list[str] | tuple[str, ...] = (),
) -> Path:
    """Fold a LoRA adapter into its base model and write a plain model directory (``peft``'s
    ``merge_and_unload``).

    The output holds the merged weights (safetensors) and config, the tokenizer (the adapter directory's if it
    has one, else the base's) and the adapter's ``lmflow_run.json``, so that the template it was trained with
    carries over. It is written into a staging directory and renamed into place: it is complete or absent.

    Args:
        base: the base model (hub id or directory); ``None``: the one the adapter names.
        adapter: a peft LoRA adapter directory (e.g. the output of ``lmflow run --plugins lora``).
        output: the directory to write; an existing non-empty one is refused unless ``overwrite``.
        dtype: dtype the base is loaded and merged in; ``auto`` keeps the dtype its weights are stored in.
        trust_remote_code: allow model code from the hub repository to run.
        plugins: installed plugins whose loading hooks (``load_tokenizer``, ``configure_model``,
            ``model_init_kwargs``, ``load_model``) load the base, as for ``lmflow generate``.

    Returns: the output directory.

    Raises:
        LmflowError: a missing or non-LoRA adapter, a missing base, an occupied output, an adapter that does
            not fit the base.
    """
    adapter_dir, output_dir = Path(adapter), Path(output)
    hint = "pass --adapter the output directory of a LoRA run (lmflow run --plugins lora)"
    if not adapter_dir.is_dir():
        raise LmflowError(f"adapter directory {adapter_dir} does not exist", hint)
    if not is_adapter(str(adapter_dir)):
        raise LmflowError(f"{adapter_dir} is not a peft adapter directory (no {ADAPTER_CONFIG})", hint)
    peft_type = read_json(adapter_dir / ADAPTER_CONFIG).get("peft_type")
    if peft_type != "LORA":
        raise LmflowError(f"{adapter_dir} holds a {peft_type} adapter, not a LoRA adapter", hint)
    base = str(base) if base is not None else adapter_base(str(adapter_dir))
    if dtype not in MERGE_DTYPES:
        raise LmflowError(f"--dtype must be one of {', '.join(MERGE_DTYPES)}, got {dtype!r}")
    if output_dir.exists() and not output_dir.is_dir():
        raise LmflowError(f"--output {output_dir} is a file", "choose a directory")
    check_output_apart(output_dir, [adapter_dir, base])
    check_replaceable(output_dir, overwrite)
    load_model_config(base, trust_remote_code, option="--base")  # a missing base fails before anything loads

    merged, tokenizer = _merged_model(base, adapter_dir, dtype, trust_remote_code, list(plugins))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{output_dir.name}-", dir=output_dir.parent))
    try:
        merged.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name in PROCESSOR_FILES:  # a vision-language adapter's image processor: AutoProcessor loads it
            if (adapter_dir / name).is_file():
                shutil.copyfile(adapter_dir / name, staging / name)
        record = read_json(adapter_dir / RUN_RECORD)
        if record:
            record["merged_from"] = {"base": base_reference(base), "adapter": str(adapter_dir.resolve())}
            (staging / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        write_output_record(staging, "merge-lora")
        move_into_place(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def _merged_model(
    base: str, adapter_dir: Path, dtype: str, trust_remote_code: bool, plugins: list[str]
) -> tuple[Any, Any]:
    """The base loaded through the loading hooks (of the core and of ``plugins``), the adapter applied and
    merged in; the tokenizer as inference loads it (``None`` when neither adapter nor base has one)."""
    quiet_libraries()
    loaded = load_pretrained(
        str(adapter_dir),
        base=base,
        plugins=plugins,
        device="cpu",
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        tokenizer_optional=True,
    )
    return loaded.model.merge_and_unload(), loaded.tokenizer


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``lmflow merge-lora``."""
    import click

    @cli.command("merge-lora")
    @click.option("--adapter", required=True, help="LoRA adapter directory (the output of a LoRA run).")
    @click.option("--base", help="Base model (id or directory); default: the one the adapter names.")
    @click.option("--output", required=True, help="Directory to write the merged model to.")
    @click.option("--overwrite", is_flag=True, help="Replace --output if it already holds something.")
    @click.option(
        "--dtype",
        type=click.Choice(MERGE_DTYPES),
        default="auto",
        show_default=True,
        help="Dtype to merge and save in; auto keeps the base's stored dtype.",
    )
    @click.option(
        "--trust-remote-code", is_flag=True, help="Allow model code from the hub repository to run."
    )
    @click.option(
        "--plugins",
        default="",
        help="Comma-separated plugins whose loading hooks load the base (with their default options).",
    )
    def merge_lora_command(
        adapter: str,
        base: str | None,
        output: str,
        overwrite: bool,
        dtype: str,
        trust_remote_code: bool,
        plugins: str,
    ) -> None:
        """Merge a LoRA adapter into its base model and write a plain model directory.

        The result loads with transformers' from_pretrained alone and keeps the adapter's tokenizer and the
        template it was trained with.
        """
        written = merge_lora(
            base,
            adapter,
            output,
            overwrite=overwrite,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            plugins=parse_names(plugins),
        )
        click.echo(f"wrote {written}: {base or adapter_base(adapter)} with the adapter {adapter} merged in")
