"""A typed store for per-run state: what a plugin keeps between the hooks of one run.

Modelled on pytest's ``Stash``: a plugin creates a module-level key once, ``STATE = StashKey[MyState]()``, and
reads and writes ``config.stash[STATE]`` in its hooks. Each run has its own :class:`RunConfig` and therefore its
own stash, so nothing of one run leaks into the next (tests, several runs in one process), and the state lives
exactly as long as the run's config.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")
D = TypeVar("D")


class StashKey(Generic[T]):
    """A key of a :class:`Stash`; each ``StashKey()`` is distinct. ``StashKey[T]()`` types the value."""

    __slots__ = ()


class Stash:
    """Values by :class:`StashKey`: ``stash[key] = value``, ``stash[key]``, ``stash.get(key, default)``,
    ``stash.setdefault(key, value)``, ``key in stash``, ``del stash[key]``."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[StashKey[Any], object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._values[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._values[key])

    def get(self, key: StashKey[T], default: D) -> T | D:
        return cast(T, self._values[key]) if key in self._values else default

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return cast(T, self._values.setdefault(key, default))

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._values[key]

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Stash({len(self._values)} values)"
