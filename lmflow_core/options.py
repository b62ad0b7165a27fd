"""Options, whether the core or a plugin declares them: one description, one coercion, one check.

A :class:`RunConfig <lmflow_core.config.RunConfig>` field carries an :class:`Option` in its metadata; a plugin's
``declare_options`` hook returns :class:`PluginOption` objects (the same type). Each option becomes a ``lmflow
run`` flag (built by :func:`lmflow_core.clickopts.click_option`) and a key in the YAML run config, a plugin's
in the section named after the plugin::

    plugins: [lisa]
    lisa:
      interval_steps: 20

Whatever a value comes from (the YAML file, a flag, a keyword of ``lmflow_core.run``), :meth:`Option.check`
turns it into the option's type and checks it, so that ``on``, ``yes``, ``true`` and ``1`` mean the same
everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

from .errors import LmflowError, PluginError

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
BOOLEAN_WORDS = ", ".join(f"{t}/{f}" for t, f in zip(TRUE_WORDS, FALSE_WORDS))

_KINDS = {
    bool: f"a boolean ({BOOLEAN_WORDS})",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list of strings",
}


@dataclass(frozen=True)
class Option:
    """One option of the core or of a plugin.

    Attributes:
        name: the key in the config (a plugin's: in its section), in ``snake_case`` (e.g. ``interval_steps``).
        type: ``bool``, ``int``, ``float``, ``str``, or ``list`` (a list of strings, a repeatable flag).
        default: the value when the option is not given.
        help: one sentence for ``--help``.
        flag: the CLI flag; default ``--<name>`` for the core, ``--<plugin>-<name>`` for a plugin, with dashes
            (e.g. ``--lisa-interval-steps``).
        choices: allowed values, if the option is an enumeration.
        min, max: inclusive bounds for numbers.

    Keyword-only:
        min_exclusive: exclusive lower bound for numbers.
        group: the ``--help`` section (a plugin's options go under ``Plugin: <name>`` unless it says).
        nullable: whether ``None`` is a value (else ``None`` is a problem: the option needs a value).
        flag_value: the value of the flag given without one (``--resume``); ``true``/``false`` in YAML mean it
            and ``None``.
        metavar: how ``--help`` names the value (default: from the type or the choices).
        parse: turns a value into the option's value instead of the type's own conversion; raises
            :class:`LmflowError` naming the problem (``--plugins a,b``).
    """

    name: str
    type: type = str
    default: Any = None
    help: str = ""
    flag: str | None = None
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    _: KW_ONLY
    min_exclusive: float | None = None
    group: str | None = None
    nullable: bool = True
    flag_value: Any = None
    metavar: str | None = None
    parse: Callable[[Any], Any] | None = None

    def flag_for(self, plugin: str | None = None) -> str:
        """The CLI flag of this option, a core option's when ``plugin`` is None."""
        if self.flag:
            return self.flag
        return "--" + (f"{plugin}_{self.name}" if plugin else self.name).replace("_", "-")

    def label(self, plugin: str | None = None) -> str:
        """How a message names the option: its flag, and for a plugin's also its YAML key."""
        flag = self.flag_for(plugin)
        return flag if plugin is None else f"option {flag} ({plugin}.{self.name})"

    def check(self, plugin: str | None, value: Any) -> tuple[Any, str | None]:
        """Coerce ``value`` to the option's type and check it; return ``(value, problem or None)``.

        ``plugin`` is the plugin that declares the option, None for a core option; it names the option in the
        problem.
        """
        where = self.label(plugin)
        if value is None:
            return None, (None if self.nullable else f"{where} needs a value")
        if self.flag_value is not None and isinstance(value, bool):
            return (self.flag_value if value else None), None  # `resume: true` means the latest checkpoint
        if self.parse is not None:
            try:
                return self.parse(value), None
            except LmflowError as exc:
                return value, exc.message
        try:
            value = coerce(value, self.type)
        except (TypeError, ValueError):
            return value, f"{where} must be {_KINDS.get(self.type, self.type.__name__)}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return value, f"{where} must be a finite number, got {value!r}"
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(map(str, self.choices))
            return value, f"{where} must be one of {allowed}, got {value!r}"
        if self.min is not None and value < self.min:
            return value, f"{where} must be at least {self.min}, got {value!r}"
        if self.min_exclusive is not None and value <= self.min_exclusive:
            return value, f"{where} must be greater than {self.min_exclusive}, got {value!r}"
        if self.max is not None and value > self.max:
            return value, f"{where} must be at most {self.max}, got {value!r}"
        return value, None


# A plugin's option is an Option; plugins and their documentation know it by this name.
PluginOption = Option


def coerce(value: Any, kind: type) -> Any:
    """``value`` as ``kind``; raises ValueError (or TypeError) when it is not one.

    Strings, as flags give them, are converted (``"1e3"``, which YAML reads as a string, is the integer 1000);
    a boolean is ``true/false``, ``yes/no``, ``on/off`` or ``1/0`` in any case; no other number is a boolean,
    and a boolean is no number.
    """
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        word = value.strip().lower() if isinstance(value, str) else None
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(value)
    if isinstance(value, bool) and kind in (int, float, str):
        raise ValueError(value)
    if kind is int:
        number = float(value)  # accepts "1e3", which YAML reads as a string
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    if kind is float:
        return float(value)
    if kind is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(value)
        return str(value)
    if kind is list:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(value)
        return list(value)
    return kind(value)


def parse_plugin_names(value: str | Sequence[str] | None) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``, without blanks or repeats, order kept (``--plugins``)."""
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [p for v in value for p in v.split(",")]
    else:
        raise PluginError(
            f'plugins must be given as names ("a,b" or a list of strings), got {value!r}', "fix --plugins"
        )
    names: list[str] = []
    for item in items:
        item = item.strip()
        if item and item not in names:
            names.append(item)
    return names
