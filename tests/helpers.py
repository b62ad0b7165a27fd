"""Plain helpers shared by the tests: tiny models, small datasets, CLI calls and checks.

Fixtures live in conftest.py; test modules import what they need from here (``from helpers import ...``).
Heavy libraries (torch, transformers, the CLI) are imported inside the functions, so importing this module
costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
# Reference data beside the project (../shared/reference), or where LMFLOW_SHARED_REFERENCE points.
SHARED = Path(os.environ.get("LMFLOW_SHARED_REFERENCE") or REPO.parent / "shared" / "reference")

# The default shape of a tiny model of each type; other types give their whole shape as overrides.
TINY_SHAPES = {
    "llama": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    },
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},
}


def tiny_model(
    model_type: str, *, seed: int = 0, dtype=None, attn_implementation: str | None = None, **overrides
):
    """A causal LM of ``model_type`` with random weights drawn after ``torch.manual_seed(seed)``, in eval mode.

    Its config is ``TINY_SHAPES[model_type]`` (if any) updated with ``overrides``; ``dtype`` converts the
    weights, ``attn_implementation`` is passed on to ``from_config``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**TINY_SHAPES.get(model_type, {}), **overrides})
    options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **options)
    return (model if dtype is None else model.to(dtype)).eval()


def save_tiny_model(model_type: str, out_dir: Path, **overrides) -> Path:
    """A ``tiny_model`` sized to the demo tokenizer, saved with that tokenizer as a normal model directory.

    The vocabulary size and the EOS, padding and BOS (= EOS) ids come from the tokenizer unless ``overrides``
    set them; ``overrides`` go on to ``tiny_model``. Returns ``out_dir``.
    """
    from transformers import AutoTokenizer

    from lmflow_core.demo import demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    ids = {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.eos_token_id,
    }
    tiny_model(model_type, **{**ids, **overrides}).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_json(path: Path, data) -> Path:
    """Write ``data`` as JSON to ``path``; returns ``path``."""
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def conversations(n: int = 24) -> list[dict]:
    """``n`` two-message conversations ("What is i plus 1?"), the instances of a conversation dataset."""
    out = []
    for i in range(n):
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {i} plus 1?"},
                    {"role": "assistant", "content": f"{i} plus 1 is {i + 1}."},
                ]
            }
        )
    return out


def invoke(runner: CliRunner, *args: str):
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from lmflow_core.cli import cli

    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def copy_tree(src: Path, dst: Path) -> Path:
    """Copy the directory ``src`` to ``dst``; returns ``dst``."""
    shutil.copytree(src, dst)
    return dst


def stopped_run(finished: Path, checkpoint: str, where: Path) -> Path:
    """What a run stopped right after ``checkpoint`` leaves in ``where``: that checkpoint and its run record."""
    shutil.copytree(finished / checkpoint, where / checkpoint)
    record = json.loads((finished / "lmflow_run.json").read_text())
    (where / "lmflow_run.json").write_text(json.dumps({**record, "status": "running", "outputs": []}))
    return where


def assert_one_line_error(result, *fragments: str) -> str:
    """A failed CLI call that printed exactly one ``Error: ...`` line containing ``fragments``."""
    assert result.exit_code != 0, result.output
    error = result.stderr.strip()
    assert error.startswith("Error: ") and "\n" not in error, error
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in error, (fragment, error)
    return error


def plugin_commands(plugin, name: str):
    """Add a plugin's commands (``register_commands``) to the CLI object ``invoke`` runs; undo afterwards.

    A generator for fixtures: ``yield from plugin_commands(plugin, "command")``.
    """
    from lmflow_core.cli import add_debug_option, cli

    added = name not in cli.commands
    if added:
        plugin.register_commands(cli)
        add_debug_option(cli.commands[name])  # as the core does for every plugin's commands
    yield
    if added:
        cli.commands.pop(name, None)


@contextlib.contextmanager
def pip_installed(source: Path, package: str):
    """pip install the package in ``source`` as a user would (no dependencies: lmflow is here already), found
    through its entry points like any installed plugin; uninstalled after unless it was installed before."""
    pip = [sys.executable, "-m", "pip"]
    present = subprocess.run([*pip, "show", "--quiet", package], capture_output=True).returncode == 0
    subprocess.run([*pip, "install", "--quiet", "--no-deps", "--no-build-isolation", str(source)], check=True)
    try:
        yield
    finally:
        if not present:
            subprocess.run([*pip, "uninstall", "--quiet", "--yes", package], check=True)


def add_to_catalog(monkeypatch, plugin, name: str) -> None:
    """Make ``plugin`` part of the catalog (the hooks called on every installed plugin), as if it were installed."""
    from lmflow_core import plugins as plugins_module

    real = plugins_module.load_catalog

    def catalog():
        pm, broken = real()
        pm.register(plugin, name=name)
        return pm, broken

    monkeypatch.setattr(plugins_module, "load_catalog", catalog)


# ==============================================================================================================
# TRL DPO reference
# ==============================================================================================================
# The losses TRL's DPOTrainer gives on a model and preference records, to hold the dpo plugin's losses against.
# TRL is an optional test dependency: callers skip without it (``pytest.importorskip("trl")``). What an
# implementation must match to give TRL's losses is summarised in trl_dpo_losses' docstring (read from TRL 1.16.0
# and checked against an independent re-implementation to 4e-6).


def trl_dpo_config(
    *,
    beta: float,
    loss_type: str,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    precompute_ref: bool = False,
    max_length: int | None = None,
    output_dir,
    **settings,
):
    """A ``trl.DPOConfig`` with the training arguments ``lmflow_core.run`` gives transformers for the same settings.

    The arguments are lmflow's own (``lmflow_core.trainer.training_kwargs`` of a ``RunConfig`` built from these
    settings, with ``logging_steps=1`` and no checkpoints), so scheduler, warm-up, weight decay, clipping,
    optimizer, seeds, precision and activation checkpointing are lmflow's defaults unless ``settings`` (further
    ``RunConfig`` fields by their ``lmflow_core.run`` names: ``grad_accum``, ``lr_scheduler``, ``warmup``,
    ``weight_decay``, ``max_grad_norm``, ``optimizer``, ``bf16``...) change them. This matters: DPOConfig's own
    defaults differ from TrainingArguments' (activation checkpointing and bf16 on, learning rate 1e-6,
    logging every 10 steps, ``max_length`` 1024).
    """
    from trl import DPOConfig

    from lmflow_core.config import RunConfig
    from lmflow_core.trainer import training_kwargs

    settings = {"logging_steps": 1, "save_steps": 0, **settings}
    config = RunConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        **settings,
    )
    kwargs = training_kwargs(config, has_eval=False)
    # TRL selects its tokenized columns itself (prompt_ids, chosen_ids, rejected_ids, ref_*_logps).
    kwargs["remove_unused_columns"] = True
    return DPOConfig(
        **kwargs,
        beta=beta,
        loss_type=[loss_type],
        max_length=max_length,  # None: no truncation (TRL's default is 1024, which also drops long prompts)
        precompute_ref_log_probs=precompute_ref,
        dataset_num_proc=None,
    )


def trl_dpo_trainer(
    model_dir,
    records: list[dict],
    *,
    peft_config=None,
    callbacks: list | None = None,
    **settings,
):
    """TRL's DPOTrainer on the model in ``model_dir`` (with its tokenizer) and the preference ``records``.

    ``settings`` are those of :func:`trl_dpo_config`. The policy is loaded from ``model_dir``; the reference is
    a second frozen copy loaded from it by TRL (``ref_model=None``), or none with ``precompute_ref=True`` (the
    policy scores the data once before training) or a ``peft_config`` (the base model with the adapter off).
    """
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, ProgressCallback
    from trl import DPOTrainer

    args = trl_dpo_config(**settings)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    trainer = DPOTrainer(
        model=str(model_dir),
        args=args,
        train_dataset=Dataset.from_list([dict(r) for r in records]),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    return trainer


def trl_dpo_losses(
    model_dir,
    records: list[dict],
    *,
    beta: float,
    loss_type: str,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    precompute_ref: bool = False,
    max_length: int | None = None,
    output_dir,
    **settings,
) -> list[float]:
    """The training loss of each of the ``steps`` optimizer steps of TRL's DPOTrainer (logging_steps=1).

    ``records`` are ``{"prompt": str, "chosen": str, "rejected": str}``; ``loss_type`` is ``"sigmoid"``,
    ``"ipo"`` or ``"hinge"``; ``settings`` are further ``lmflow_core.run`` settings (see :func:`trl_dpo_config`).
    Runs where transformers puts it (the CPU here), on a tiny model in seconds. At step 1 the policy is the
    reference: sigmoid gives ln 2, hinge 1, ipo 1/(4 beta^2).

    What an implementation must do to give the same losses (TRL 1.16):

    * tokens: ``prompt_ids = tok(prompt)``, ``full = tok(prompt + chosen + eos_token)`` (the EOS *string* is
      appended unless the text ends with it; default ``add_special_tokens=True``, so a BOS the tokenizer adds
      starts both), same for rejected; the completion starts at the longest common prefix of ``prompt_ids`` with
      both full sequences (usually ``len(prompt_ids)``; shorter when tokens merge across the boundary);
    * logps: sum over completion tokens of ``log_softmax(logits[t-1])[token t]``, float32, no averaging;
      chosen and rejected in one forward, padded on the right, ``[chosen..., rejected...]``;
    * loss per pair with ``d = (pi_c - ref_c) - (pi_r - ref_r)``: sigmoid ``-logsigmoid(beta d)`` (no label
      smoothing), hinge ``relu(1 - beta d)``, ipo ``(d_avg - 1/(2 beta))^2`` where ``d_avg`` divides each log
      ratio by its completion's token count; the batch loss is the mean over pairs;
    * the logged loss of a step is the mean of its micro-batch losses (gradient accumulation);
    * batches: the dataset in record order, sampled by transformers' Trainer with ``seed``/``data_seed`` (no
      example dropped when ``max_length`` is None), dropout disabled in both models.
    """
    trainer = trl_dpo_trainer(
        model_dir,
        records,
        beta=beta,
        loss_type=loss_type,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        precompute_ref=precompute_ref,
        max_length=max_length,
        output_dir=output_dir,
        **settings,
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@contextlib.contextmanager
def serving(session, **settings):
    """``lmflow serve``'s server for ``session`` in a thread; yields it (``.base`` is its URL)."""
    from lmflow_core.launch import free_port
    from lmflow_core.serve import ServeSettings, make_server

    settings.setdefault("ui", False)
    server = make_server(session, ServeSettings(port=free_port(), **settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.05)
    server.base = f"127.0.0.1:{server.config.port}"
    server.thread = thread
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(30)
        server.lmflow.engine.close()
