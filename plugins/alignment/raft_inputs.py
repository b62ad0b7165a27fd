"""What RAFT reads: the prompts file and the reward (a function or a reward model directory), checked before
any model loads.

A reward function is named ``module:function`` (an importable module) or ``path/to/file.py:function``. It is
called once per iteration with every sample of the iteration::

    def reward(prompts: list[list[dict]], answers: list[str]) -> Sequence[float]

``prompts[i]`` is the conversation that was answered (OpenAI-style messages ``{"role", "content"}``, a leading
``system`` message if the record had one, ending with the user's message) and ``answers[i]`` the generated
answer; it returns one real number per answer (a list, tuple or 1-D array), higher is better. Anything else (a
different count, a value that is not a real number, NaN or infinity) stops the run with an error naming the
sample.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmflow_core import DataError, LmflowError, read_input_text

RewardFunction = Callable[[list[list[dict[str, Any]]], list[str]], Sequence[float]]

PROMPTS_FIX = (
    'pass a .json file (a list of records) or a .jsonl file (one record a line) of {"prompt": "..."} or '
    '{"messages": [...]} records'
)
REWARD_FIX = (
    "pass --reward a reward model directory, module:function or path/to/file.py:function (see README, RAFT)"
)


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompts:
    """The prompts of a RAFT run: ``conversations[i]`` is the message list to answer; ``digest`` the file's
    SHA-256 (so a resumed run can tell the file changed)."""

    path: Path
    conversations: list[list[dict[str, str]]]
    digest: str

    def text(self, index: int) -> str:
        """The user message that prompt ``index`` ends with."""
        return self.conversations[index][-1]["content"]


def read_prompts(path: str | os.PathLike) -> Prompts:
    """Read and check a prompts file: ``.json`` (a list of records) or ``.jsonl`` (one record a line).

    A record is ``{"prompt": "..."}`` (one user message, optionally with ``"system"``) or ``{"messages": [...]}``
    (``{"role", "content"}`` messages: an optional leading system message, then user and assistant turns
    alternating, ending with a user message). Errors name the file and the record (``line N`` of a ``.jsonl``
    file, ``record N`` of a ``.json`` list, counted from 0).
    """
    file = Path(path).expanduser()
    text = read_input_text(file, "--prompts file", PROMPTS_FIX, DataError)
    items: list[tuple[str, Any]] = []
    if file.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"line {number}", json.loads(line)))
            except (ValueError, RecursionError) as exc:
                raise DataError(f"{file}: line {number} is not valid JSON ({exc})", "fix that line") from None
    elif file.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{file} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                "fix the syntax",
            ) from None
        except RecursionError:
            raise DataError(f"{file} nests JSON deeper than lmflow reads", "flatten the records") from None
        if not isinstance(data, list):
            raise DataError(f"{file} holds a JSON {type(data).__name__}, not a list of records", PROMPTS_FIX)
        items = [(f"record {i}", item) for i, item in enumerate(data)]
    else:
        raise DataError(f"--prompts file {file} is neither .json nor .jsonl", PROMPTS_FIX)
    if not items:
        raise DataError(f"{file} holds no prompts", PROMPTS_FIX)
    conversations = [prompt_messages(item, f"{file}: {label}") for label, item in items]
    return Prompts(file, conversations, hashlib.sha256(text.encode("utf-8")).hexdigest())


def prompt_messages(record: Any, where: str) -> list[dict[str, str]]:
    """The message list of one prompt record; a :class:`DataError` naming ``where`` if it is malformed."""
    fix = 'give it "prompt" (text) or "messages" (a list of {"role", "content"} ending with a user message)'
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object", fix)
    if ("prompt" in record) == ("messages" in record):
        keys = ", ".join(repr(k) for k in record) or "none"
        raise DataError(f'{where} must have exactly one of "prompt" and "messages" (its keys: {keys})', fix)
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f'{where}: "system" must be text', "give the system prompt as a string")
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f'{where}: "prompt" must be non-empty text, got {prompt!r}'[:300], fix)
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list', fix)
    out: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f'{where}: message {i} must be an object with "role" and text "content"', fix)
        role = message.get("role")
        expected = "user" if not out or out[-1]["role"] in ("system", "assistant") else "assistant"
        if role == "system" and not out:
            expected = "system"
        if role != expected:
            raise DataError(
                f"{where}: message {i} is from {role!r} but {expected!r} was expected (an optional system "
                "message first, then user and assistant alternating, ending with user)",
                fix,
            )
        out.append({"role": role, "content": message["content"]})
    if out[-1]["role"] != "user":
        raise DataError(f"{where}: the last message is from {out[-1]['role']!r}; it must be the user's", fix)
    return out


# --------------------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------------------


def describe_callable(function: Any) -> str:
    """``module:qualname`` of a function, how a run records the reward it used."""
    module = getattr(function, "__module__", None) or "?"
    return f"{module}:{getattr(function, '__qualname__', type(function).__name__)}"


def is_function_spec(reward: str) -> bool:
    """Whether ``--reward`` names a function (``module:function``, ``file.py:function``) rather than a
    directory."""
    if Path(reward).expanduser().is_dir():
        return False
    target, _, name = reward.rpartition(":")
    return bool(target) and bool(name) and name.isidentifier()


def load_reward_function(spec: str) -> tuple[RewardFunction, str]:
    """Import the function ``spec`` names; returns it and how the run records it (a file resolved)."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        file = Path(target).expanduser()
        if not file.is_file():
            raise LmflowError(f"--reward {spec}: file {file} does not exist", REWARD_FIX)
        module_name = f"lmflow_raft_reward_{hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]}"
        module_spec = importlib.util.spec_from_file_location(module_name, file)
        if module_spec is None or module_spec.loader is None:
            raise LmflowError(f"--reward {spec}: {file} cannot be imported", REWARD_FIX)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise LmflowError(
                f"--reward {spec}: importing {file} failed ({type(exc).__name__}: {exc})", "fix the file"
            ) from exc
        recorded = f"{file.resolve()}:{name}"
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and target.startswith(exc.name):
                raise LmflowError(
                    f"--reward {spec}: there is no module '{target}' (neither a directory nor an importable "
                    "module)",
                    REWARD_FIX,
                ) from None
            raise LmflowError(
                f"--reward {spec}: importing {target} failed ({type(exc).__name__}: {exc})", "fix the module"
            ) from exc
        except Exception as exc:
            raise LmflowError(
                f"--reward {spec}: importing {target} failed ({type(exc).__name__}: {exc})", "fix the module"
            ) from exc
        recorded = spec
    function = getattr(module, name, None)
    if function is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        listed = f" (it has {', '.join(found[:8])})" if found else ""
        raise LmflowError(f"--reward {spec}: {target} has no function '{name}'{listed}", REWARD_FIX)
    if not callable(function):
        raise LmflowError(
            f"--reward {spec}: '{name}' in {target} is not a function (it is a {type(function).__name__})",
            REWARD_FIX,
        )
    return function, recorded


def checked_rewards(values: Any, count: int, source: str, label: Callable[[int], str]) -> list[float]:
    """The rewards a function returned, as floats: exactly ``count`` finite real numbers, else an error naming
    the first bad one (``label(i)`` says which sample it scored)."""
    fix = f"make {source} return one finite real number (a float) per answer"
    if hasattr(values, "tolist"):  # numpy arrays and torch tensors
        values = values.tolist()
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
        raise LmflowError(
            f"reward {source} returned a {type(values).__name__}, not a list of {count} floats", fix
        )
    if len(values) != count:
        raise LmflowError(f"reward {source} returned {len(values)} values for {count} answers", fix)
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise LmflowError(
                f"reward {source} returned {type(value).__name__} {value!r} for {label(i)}"[:300], fix
            )
        value = float(value)
        if not math.isfinite(value):
            raise LmflowError(f"reward {source} returned {value} for {label(i)}", fix)
        out.append(value)
    return out
