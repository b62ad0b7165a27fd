"""RAFT (plugin ``raft``): reward-ranked fine-tuning; sample, keep the best by a reward, fine-tune, repeat.

RAFT (Dong et al., "RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment", arXiv
2304.06767) aligns a model with a reward without reinforcement learning. Each iteration

1. samples K answers to every prompt from the current model, through the ``decode`` hook (the model loads and
   generates as ``lmflow chat`` does, in the template it was trained with);
2. scores every answer with the reward: a function of yours, or a reward model directory (see ``scoring.py``);
3. keeps the best: the best of the K answers of each prompt (``per-prompt``), or the top fraction of all the
   iteration's samples (``global``);
4. fine-tunes the current model on the kept answers as conversations, with the same training as ``lmflow run``
   (``lmflow_core.run``); the result is the model of the next iteration.

    lmflow raft --model M --prompts prompts.jsonl --reward rewards.py:score --output raft-out --iterations 3

Every iteration is written into a staging directory and renamed to ``iteration-N`` once complete (its samples
and rewards, the training data, the trained model); ``raft.json`` summarises the run. A killed run continues at
its last finished iteration with ``--resume`` and ends as an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmflow_core import (
    ConfigError,
    LmflowError,
    PluginError,
    __version__,
    atomic_write,
    check_output_apart,
    hookimpl,
    is_adapter,
    load_model_config,
    read_json,
    stored_run,
)

from .raft_inputs import (
    Prompts,
    RewardFunction,
    checked_rewards,
    describe_callable,
    is_function_spec,
    load_reward_function,
    read_prompts,
)

if TYPE_CHECKING:
    import click

__all__ = ["STRATEGIES", "SUMMARY", "RaftResult", "raft", "select_kept"]

NAME = "raft"
SUMMARY = "raft.json"
ITERATION_RECORD = "iteration.json"
STRATEGIES = ("per-prompt", "global")
STAGING_PREFIX = ".staging-iteration-"
PREFLIGHT = "raft_preflight"  # the name of the plugin that stops the training checks
# The settings that decide a run's results: a resumed run must be given the same ones (--iterations may grow).
RESULT_SETTINGS = (
    "model",
    "prompts_sha256",
    "reward",
    "samples_per_prompt",
    "strategy",
    "top_fraction",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "learning_rate",
    "epochs",
    "max_steps",
    "batch_size",
    "template",
    "plugins",
    "train_config",
    "dtype",
)


@dataclass
class RaftResult:
    """What :func:`raft` returns (and records in ``raft.json``).

    Attributes:
        output_dir: the run's directory.
        model: the latest trained model directory (``iteration-N/model``; the input model if none was trained).
        iterations: one dict per finished iteration, as in ``raft.json``: ``mean_reward`` (all samples),
            ``mean_kept_reward``, ``min_reward``, ``max_reward``, ``samples``, ``kept``, ``train`` (steps,
            logged losses, seconds), ``seconds``.
        resumed_from: iterations already finished when this call started (0 for a new run).
    """

    output_dir: Path
    model: Path
    iterations: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0

    @property
    def mean_rewards(self) -> list[float]:
        """The mean reward of all samples of each iteration (the model of iteration N-1 answering)."""
        return [it["mean_reward"] for it in self.iterations]


# --------------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------------


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``lmflow raft``."""
    from .raft_cli import add_command

    add_command(cli)


# --------------------------------------------------------------------------------------------------------------
# From Python
# --------------------------------------------------------------------------------------------------------------


def raft(
    model: str | os.PathLike,
    prompts: str | os.PathLike,
    reward: str | os.PathLike | RewardFunction,
    output_dir: str | os.PathLike,
    *,
    iterations: int = 3,
    samples_per_prompt: int = 4,
    strategy: str = "per-prompt",
    top_fraction: float = 0.25,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 42,
    learning_rate: float | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    template: str | None = None,
    plugins: Sequence[str] | None = None,
    train_config: str | os.PathLike | dict[str, Any] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> RaftResult:
    """Reward-ranked fine-tuning of ``model`` on ``prompts`` for ``iterations`` rounds, written to ``output_dir``.

    Args:
        model: the model to start from: a model directory or hub id (a causal LM; not a LoRA adapter).
        prompts: a ``.json``/``.jsonl`` file of ``{"prompt": ...}`` or ``{"messages": [...]}`` records.
        reward: a reward model directory (a ``*ForSequenceClassification`` with one label), a function spec
            ``module:function`` or ``path/to/file.py:function``, or a function
            ``reward(prompts: list[list[dict]], answers: list[str]) -> Sequence[float]`` (see ``raft_inputs``).
        output_dir: where the iterations and ``raft.json`` go; new or empty (or a RAFT run, with ``resume`` or
            ``overwrite``).
        iterations: rounds of sample, score, keep, fine-tune.
        samples_per_prompt: answers sampled per prompt in each iteration (K).
        strategy: ``per-prompt`` keeps the best of the K answers of each prompt; ``global`` keeps the
            ``top_fraction`` best of all the iteration's samples.
        top_fraction: the share of samples ``global`` keeps, in (0, 1] (rounded up, at least one).
        temperature, top_p, max_new_tokens: sampling settings of the ``decode`` hook.
        seed: seed of the sampling (each sample has its own, derived from it) and of the training.
        learning_rate, epochs, max_steps, batch_size: training settings of every iteration, ``lmflow run``'s
            options of those names (``max_steps`` overrides ``epochs``); ``None``: the value in
            ``train_config``, else ``lmflow run``'s default (2e-5, 3 epochs, batch size 8).
        template: conversation template of the sampling and the training; default: the one stored with the
            model, else its tokenizer's chat template.
        plugins: plugins for the training (e.g. ``["lora"]``: each iteration's adapter is merged into its
            base, so the next iteration starts from a plain model); ``None``: ``train_config``'s, else none.
        train_config: more ``lmflow run`` settings for the training, a YAML file or a dict (e.g.
            ``{"warmup": 0.1, "lora": {"rank": 16}}``); the arguments above that are given win over it, and
            RAFT sets the model, dataset, output directory, template and seed of each iteration's run.
        device, dtype: where and in which dtype the model samples and a reward model scores (``auto``: a GPU
            if there is one; bfloat16 there, else float32).
        resume: continue the RAFT run in ``output_dir`` after its last finished iteration.
        overwrite: replace the RAFT run in ``output_dir`` (only what RAFT wrote is removed).
        log: where progress lines go (``None``: nowhere).

    Returns: a :class:`RaftResult`.

    Raises:
        LmflowError: everything a user can get wrong, before any model loads where it can be known then (bad
            options, prompts, reward, training settings or output directory), or when a reward function
            returns something other than one finite number per answer.
    """
    say = log or (lambda _text: None)
    out = Path(output_dir).expanduser()
    check_settings(iterations, samples_per_prompt, strategy, top_fraction, temperature, top_p, max_new_tokens)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other", "pass only one of them")
    model = str(model)
    if is_adapter(model):
        raise ConfigError(
            f"--model {model} is a LoRA adapter; RAFT fine-tunes a whole model each iteration",
            f"merge it first (lmflow merge-lora --adapter {model} --output MERGED) and pass --model MERGED",
        )
    load_model_config(model, option="--model")  # a missing model fails before anything loads
    prompt_set = read_prompts(prompts)
    scorer, reward_recorded, reward_dir = resolve_reward(reward)
    # The training settings (and the template) are checked by preflight_training, as lmflow run checks them.
    stored_template = template or stored_run(model).get("template")
    given = {
        "learning_rate": learning_rate,
        "epochs": epochs,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "plugins": list(plugins) if plugins is not None else None,
    }
    train_settings = {"seed": seed, **{key: value for key, value in given.items() if value is not None}}
    inputs = [model, prompt_set.path] + ([reward_dir] if reward_dir else [])
    if isinstance(train_config, (str, os.PathLike)):
        inputs.append(train_config)
    check_output_apart(out, inputs, flag="--output")
    preflight_training(model, stored_template, train_config, train_settings, out)

    settings = {
        "model": model if not Path(model).exists() else str(Path(model).resolve()),
        "prompts": str(prompt_set.path.resolve()),
        "prompts_sha256": prompt_set.digest,
        "reward": reward_recorded,
        "samples_per_prompt": samples_per_prompt,
        "strategy": strategy,
        "top_fraction": top_fraction,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        **given,
        "template": template,
        "train_config": describe_train_config(train_config),
        "dtype": dtype,
    }
    settings = json.loads(json.dumps(settings, default=str))  # as raft.json holds them, to compare on resume
    finished = prepare_output(out, settings, resume, overwrite, say)
    summary = {
        "command": NAME,
        "lmflow_version": __version__,
        "status": "running",
        "iterations_planned": iterations,
        "settings": settings,
        "iterations": finished,
        "model": None,
    }
    write_summary(out, summary, model)
    result = RaftResult(out, latest_model(out, finished, model), list(finished), len(finished))
    if finished:
        say(f"resuming {out}: {len(finished)} of {iterations} iterations finished")
    reward_model = None
    for iteration in range(len(finished) + 1, iterations + 1):
        current = str(latest_model(out, result.iterations, model))
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{iteration}-", dir=out))
        try:
            session = open_policy(current, template, device, dtype)
            template_name = session.template_name
            say(
                f"iteration {iteration}/{iterations}: sampling {samples_per_prompt} answers for each of "
                f"{len(prompt_set.conversations)} prompts from {current}"
            )
            samples = sample_answers(
                session,
                prompt_set,
                samples_per_prompt,
                iteration,
                seed,
                sampling(temperature, top_p, max_new_tokens),
            )
            release(session)
            if scorer is None and reward_model is None:
                reward_model = load_reward_model(reward_dir, template_name, device, dtype)
            rewards = score_samples(samples, scorer, reward_model, reward_recorded)
            kept = select_kept(rewards, samples_per_prompt, strategy, top_fraction)
            stats = write_samples(staging, samples, rewards, kept)
            say(
                f"iteration {iteration}/{iterations}: {stats['samples']} samples, mean reward "
                f"{stats['mean_reward']:.4g}; kept {stats['kept']}, mean reward {stats['mean_kept_reward']:.4g}; "
                "training"
            )
            stats["train"] = train_on_kept(
                current, staging, template_name, train_config, train_settings, list(plugins or ())
            )
            record = {"iteration": iteration, "model_sampled": current, **stats}
            record["seconds"] = round(time.monotonic() - started, 3)
            atomic_write(staging / ITERATION_RECORD, json.dumps(record, indent=2) + "\n")
            os.replace(staging, out / f"iteration-{iteration}")  # the iteration is finished from here on
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        result.iterations.append(record)
        result.model = latest_model(out, result.iterations, model)
        summary["iterations"] = result.iterations
        write_summary(out, summary, model)
        say(f"iteration {iteration}/{iterations}: done in {record['seconds']:.1f}s; model {result.model}")
    summary["status"] = "completed" if len(result.iterations) >= iterations else "running"
    write_summary(out, summary, model)
    return result


# --------------------------------------------------------------------------------------------------------------
# Checks, before anything loads
# --------------------------------------------------------------------------------------------------------------


def check_settings(
    iterations: int,
    samples_per_prompt: int,
    strategy: str,
    top_fraction: float,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
) -> None:
    """Every out-of-range RAFT setting, reported at once."""
    problems = []
    if iterations < 1:
        problems.append(f"--iterations must be at least 1, got {iterations}")
    if samples_per_prompt < 1:
        problems.append(f"--samples-per-prompt must be at least 1, got {samples_per_prompt}")
    if strategy not in STRATEGIES:
        problems.append(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not 0 < top_fraction <= 1:
        problems.append(
            f"--top-fraction must be in (0, 1], got {top_fraction:g}; e.g. 0.25 keeps the best quarter"
        )
    if not temperature > 0:
        problems.append(f"--temperature must be greater than 0, got {temperature:g}")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {top_p:g}")
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if problems:
        raise ConfigError.collect(problems, "RAFT settings")


def resolve_reward(reward: Any) -> tuple[RewardFunction | None, str, Path | None]:
    """``(function or None, how the run records the reward, reward model directory or None)``."""
    from .scoring import check_reward_model_dir

    if callable(reward):
        return reward, describe_callable(reward), None
    spec = str(reward)
    if is_function_spec(spec):
        function, recorded = load_reward_function(spec)
        return function, recorded, None
    directory = Path(spec).expanduser()
    if not directory.exists():
        raise LmflowError(
            f"--reward {spec} is neither a directory nor a function (module:function or file.py:function)",
            "pass a reward model directory, module:function or path/to/file.py:function",
        )
    check_reward_model_dir(directory)
    return None, str(directory.resolve()), directory


class _Checked(Exception):
    """Raised by the preflight plugin once ``lmflow run`` has checked the training settings."""


def _preflight_plugin() -> Any:
    """A plugin whose ``configure_model`` stops the run: that hook comes right after every plugin's
    ``validate_config``, before the tokenizer, the weights or the data load. (Built here, not at module level:
    a marked function in this module would be taken as one of the raft plugin's hooks.)"""

    @hookimpl
    def configure_model(config: Any, model_config: Any) -> None:
        raise _Checked

    return types.SimpleNamespace(configure_model=configure_model)


def preflight_training(
    model: str,
    template: str | None,
    train_config: Any,
    settings: dict[str, Any],
    out: Path,
) -> None:
    """Check the training settings (plugins and their options, the train config) as ``lmflow run`` does,
    stopping before it loads anything: a mistake there costs a second, not an iteration of sampling."""
    import lmflow_core

    try:
        lmflow_core.run(
            train_config,
            model=model,
            dataset=str(out / "iteration-1" / "train.jsonl"),
            output_dir=str(out / "iteration-1" / "model"),
            template=template,
            save_steps=0,
            resume=False,
            overwrite=False,
            extra_plugins={PREFLIGHT: _preflight_plugin()},
            **settings,
        )
    except _Checked:
        return
    except PluginError as exc:  # the checking plugin is none the user can name: not among those listed
        message = exc.message.replace(f", {PREFLIGHT}", "").replace(f"{PREFLIGHT}, ", "")
        raise PluginError(message, exc.hint) from None


def describe_train_config(train_config: Any) -> Any:
    """How a run records its train config: the dict, or a file's path and SHA-256."""
    if train_config is None or isinstance(train_config, dict):
        return train_config
    path = Path(train_config).expanduser()
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return {"path": str(path.resolve()), "sha256": digest}


# --------------------------------------------------------------------------------------------------------------
# The output directory: raft.json, iteration-N/ (each renamed into place once complete)
# --------------------------------------------------------------------------------------------------------------


def owned_entry(name: str) -> bool:
    """Whether an entry of a RAFT run's directory is one RAFT writes."""
    if name in (SUMMARY, f".{SUMMARY}.tmp") or name.startswith(STAGING_PREFIX):
        return True
    prefix, _, number = name.partition("-")
    return prefix == "iteration" and number.isdigit()


def finished_iterations(out: Path) -> list[dict[str, Any]]:
    """The records of the iterations finished in ``out``: ``iteration-1``, ``iteration-2``... while they exist
    (a directory there is complete: it was renamed into place once written)."""
    records = []
    while (out / f"iteration-{len(records) + 1}").is_dir():
        record = read_json(out / f"iteration-{len(records) + 1}" / ITERATION_RECORD)
        if not record:
            break
        records.append(record)
    return records


def prepare_output(
    out: Path, settings: dict[str, Any], resume: bool, overwrite: bool, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Judge the output directory; returns the finished iterations to continue from (``[]`` for a new run).

    A directory RAFT did not write (no ``raft.json``) is refused if it holds anything, and nothing in it is
    touched. A RAFT run is continued with ``resume`` (with the same settings), replaced with ``overwrite`` (only
    the entries RAFT writes are removed; anything else stops it), or refused.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file", "choose a directory")
    entries = sorted(os.listdir(out)) if out.is_dir() else []
    if not entries:
        if resume:
            say(f"note: --resume: {out} holds no RAFT run yet; starting one")
        out.mkdir(parents=True, exist_ok=True)
        return []
    summary = read_json(out / SUMMARY)
    if summary.get("command") != NAME:
        raise ConfigError(
            f"--output {out} is not empty and holds no RAFT run (no {SUMMARY}); nothing was changed",
            "choose a new or empty --output directory",
        )
    finished = finished_iterations(out)
    if resume:
        stored = summary.get("settings") or {}
        differences = [
            "--prompts: the file's content differs"
            if key == "prompts_sha256"
            else f"--{key.replace('_', '-')} {json.dumps(stored.get(key))} there, {json.dumps(settings.get(key))} now"
            for key in RESULT_SETTINGS
            if stored.get(key) != settings.get(key)
        ]
        if differences:
            raise ConfigError(
                f"--resume: the RAFT run in {out} was started with other settings ({'; '.join(differences)})",
                "resume with the settings it was started with (only --iterations may change), or choose "
                "another --output",
            )
        for name in entries:  # what a killed iteration left half-written
            if name.startswith(STAGING_PREFIX):
                shutil.rmtree(out / name, ignore_errors=True)
        return finished
    if not overwrite:
        raise ConfigError(
            f"--output {out} already holds a RAFT run ({len(finished)} iterations finished)",
            "pass --resume to continue it, --overwrite to replace it, or choose another --output",
        )
    foreign = [name for name in entries if not owned_entry(name)]
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise ConfigError(
            f"--overwrite: --output {out} holds files RAFT did not write ({shown}); nothing was deleted",
            "move them out of the directory, or choose another --output",
        )
    # The summary goes last: until then what is left is recognisably RAFT's, so a stopped --overwrite can be
    # repeated.
    for name in sorted(entries, key=lambda n: n == SUMMARY):
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return []


def latest_model(out: Path, finished: list[dict[str, Any]], model: str) -> Path:
    """The model the next iteration samples from: the last finished iteration's, else the input model."""
    return out / f"iteration-{len(finished)}" / "model" if finished else Path(model)


def write_summary(out: Path, summary: dict[str, Any], model: str) -> None:
    """Write ``raft.json`` atomically, with the trend of the mean rewards and the latest model."""
    iterations = summary["iterations"]
    summary["model"] = str(latest_model(out, iterations, model))
    summary["mean_reward"] = [it["mean_reward"] for it in iterations]
    summary["mean_kept_reward"] = [it["mean_kept_reward"] for it in iterations]
    atomic_write(out / SUMMARY, json.dumps(summary, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------
# One iteration: sample, score, keep, train
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One sampled answer: ``prompt`` indexes the prompts, ``index`` is its number among the prompt's K."""

    prompt: int
    index: int
    messages: list[dict[str, str]]
    answer: str
    seed: int
    finish_reason: str


def sampling(temperature: float, top_p: float, max_new_tokens: int) -> dict[str, Any]:
    """The ``GenerationOptions`` settings of RAFT's sampling (a seed is added per sample)."""
    return {"greedy": False, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}


def sample_seed(seed: int, iteration: int, prompt: int, index: int) -> int:
    """The seed of one sample: a function of the run's seed and the sample's place alone, so a resumed run
    draws what an uninterrupted one draws."""
    digest = hashlib.sha256(f"raft:{seed}:{iteration}:{prompt}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def open_policy(model: str, template: str | None, device: str, dtype: str) -> Any:
    """The model to sample from, loaded as ``lmflow chat`` loads it."""
    from lmflow_core import open_session

    session = open_session(model, template=template, device=device, dtype=dtype)
    if session.template is None:
        raise LmflowError(
            f"model {model} has no conversation template (none stored with it, and its tokenizer has no chat "
            "template)",
            "pass --template NAME (see `lmflow templates list`)",
        )
    return session


def sample_answers(
    session: Any, prompts: Prompts, k: int, iteration: int, seed: int, options: dict[str, Any]
) -> list[Sample]:
    """K sampled answers to each prompt, in prompt order, one generation at a time through the session (and so
    through the ``decode`` hook)."""
    from lmflow_core import DataError, GenerationOptions, TemplateError

    samples = []
    for p, messages in enumerate(prompts.conversations):
        for i in range(k):
            sample_seed_value = sample_seed(seed, iteration, p, i)
            try:
                generation = session.chat(messages, GenerationOptions(**options, seed=sample_seed_value))
            except TemplateError as exc:
                raise DataError(
                    f"{prompts.path}: prompt {p} does not fit the template '{session.template_name}': "
                    f"{exc.message}",
                    exc.hint or "fix the prompt or choose another --template",
                ) from None
            samples.append(
                Sample(p, i, messages, generation.text, sample_seed_value, generation.finish_reason)
            )
    return samples


def release(session: Any) -> None:
    """Free a GPU's memory of the sampling model before training (on the CPU dropping it is enough, and a full
    garbage collection costs a second)."""
    device = getattr(session.model, "device", None)
    session.model = None
    if getattr(device, "type", "cpu") == "cuda":
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def load_reward_model(directory: Path | None, template: str | None, device: str, dtype: str) -> Any:
    """The reward model, its template the one stored with it, else the policy's."""
    from .scoring import RewardModel

    assert directory is not None
    return RewardModel.load(
        directory, template=template, device=device, dtype="float32" if dtype == "auto" else dtype
    )


def score_samples(
    samples: list[Sample], function: RewardFunction | None, reward_model: Any, source: str
) -> list[float]:
    """The reward of every sample, checked: one finite real number each."""
    if function is None:
        conversations = [[*s.messages, {"role": "assistant", "content": s.answer}] for s in samples]
        return reward_model.score(conversations)
    values = function([[dict(m) for m in s.messages] for s in samples], [s.answer for s in samples])

    def label(i: int) -> str:
        return f"sample {samples[i].index} of prompt {samples[i].prompt} (answer {samples[i].answer[:40]!r})"

    return checked_rewards(values, len(samples), source, label)


def select_kept(rewards: Sequence[float], k: int, strategy: str, top_fraction: float) -> list[bool]:
    """Which samples to train on.

    ``per-prompt``: the best of each prompt's ``k`` consecutive samples (the first of equals). ``global``: the
    ``ceil(top_fraction * n)`` best of all ``n`` (at least one; the earlier of equals). Either way the kept
    samples' mean reward is at least the mean of all.
    """
    n = len(rewards)
    kept = [False] * n
    if strategy == "per-prompt":
        for start in range(0, n, k):
            best = max(range(start, min(start + k, n)), key=lambda i: (rewards[i], -i))
            kept[best] = True
    else:
        count = max(1, math.ceil(round(top_fraction * n, 9)))
        for i in sorted(range(n), key=lambda i: (-rewards[i], i))[:count]:
            kept[i] = True
    return kept


def write_samples(
    staging: Path, samples: list[Sample], rewards: list[float], kept: list[bool]
) -> dict[str, Any]:
    """Write ``rewards.jsonl`` (every sample) and ``train.jsonl`` (the kept ones as conversations); returns the
    iteration's reward figures."""
    rows, train = [], []
    for sample, reward, keep in zip(samples, rewards, kept):
        row = {
            "prompt_index": sample.prompt,
            "sample": sample.index,
            "prompt": sample.messages[-1]["content"],
            "answer": sample.answer,
            "reward": reward,
            "kept": keep,
            "seed": sample.seed,
            "finish_reason": sample.finish_reason,
        }
        if len(sample.messages) > 1:
            row["messages"] = sample.messages
        rows.append(json.dumps(row, ensure_ascii=False))
        if keep:
            conversation = [*sample.messages, {"role": "assistant", "content": sample.answer}]
            train.append(json.dumps({"messages": conversation}, ensure_ascii=False))
    (staging / "rewards.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (staging / "train.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
    kept_rewards = [r for r, keep in zip(rewards, kept) if keep]
    return {
        "samples": len(rewards),
        "kept": len(kept_rewards),
        "mean_reward": sum(rewards) / len(rewards),
        "mean_kept_reward": sum(kept_rewards) / len(kept_rewards),
        "min_reward": min(rewards),
        "max_reward": max(rewards),
    }


def train_on_kept(
    model: str,
    staging: Path,
    template: str | None,
    train_config: Any,
    settings: dict[str, Any],
    plugins: list[str],
) -> dict[str, Any]:
    """Fine-tune ``model`` on the kept answers (``lmflow_core.run``) into ``staging/model``; a LoRA adapter is
    merged into its base there, so the next iteration starts from a plain model."""
    import lmflow_core

    trained = staging / "model"
    result = lmflow_core.run(
        train_config,
        model=model,
        dataset=str(staging / "train.jsonl"),
        output_dir=str(trained),
        template=template,
        save_steps=0,
        resume=False,
        overwrite=False,
        **settings,
    )
    if is_adapter(str(trained)):
        from lmflow_plugins.lora import merge_lora

        adapter = staging / "adapter"
        os.replace(trained, adapter)
        merge_lora(model, adapter, trained, plugins=[p for p in plugins if p != "lora"])
    return {
        "global_step": result.global_step,
        "losses": [list(pair) for pair in result.losses],  # (step, loss) as the run logged them
        "train_seconds": round(result.train_seconds, 3),
    }
