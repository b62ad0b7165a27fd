"""Options that plugins declare, and their validation.

A plugin's ``declare_options`` hook returns :class:`PluginOption` objects. Each becomes a ``lmflow run`` flag
and a key in the plugin's section of the YAML run config::

    plugins: [lisa]
    lisa:
      interval_steps: 20
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class PluginOption:
    """One option of a plugin.

    Attributes:
        name: the key in the plugin's config section, in ``snake_case`` (e.g. ``interval_steps``).
        type: ``bool``, ``int``, ``float`` or ``str``.
        default: the value when the option is not given.
        help: one sentence for ``--help``.
        flag: the CLI flag; default ``--<plugin>-<name>`` with dashes (e.g. ``--lisa-interval-steps``).
        choices: allowed values, if the option is an enumeration.
        min, max: inclusive bounds for numbers.
    """

    name: str
    type: type = str
    default: Any = None
    help: str = ""
    flag: str | None = None
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None

    def flag_for(self, plugin: str) -> str:
        """The CLI flag of this option when it belongs to ``plugin``."""
        if self.flag:
            return self.flag
        return "--" + f"{plugin}_{self.name}".replace("_", "-")

    def check(self, plugin: str, value: Any) -> tuple[Any, str | None]:
        """Coerce ``value`` to the option's type and check it; return ``(value, problem or None)``."""
        where = f"option {self.flag_for(plugin)} ({plugin}.{self.name})"
        if value is None:
            return None, None
        try:
            value = _coerce(value, self.type)
        except (TypeError, ValueError):
            return value, f"{where} must be {_TYPES.get(self.type, self.type.__name__)}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return value, f"{where} must be a finite number, got {value!r}"
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(map(str, self.choices))
            return value, f"{where} must be one of {allowed}, got {value!r}"
        if self.min is not None and value < self.min:
            return value, f"{where} must be at least {self.min}, got {value!r}"
        if self.max is not None and value > self.max:
            return value, f"{where} must be at most {self.max}, got {value!r}"
        return value, None


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "yes", "1", "on", "false", "no", "0", "off"}:
            return value.lower() in {"true", "yes", "1", "on"}
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value)
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(value)
        return str(value)
    return kind(value)
