"""Plugin discovery, selection and the plugin manager of a run.

Plugins are found through the ``lmflow.plugins`` entry-point group. The built-in plugins are registered in
lmflow's own ``pyproject.toml`` through that group, so ``--plugins NAME`` finds a built-in exactly as it finds a
plugin from a package the user installed with pip. Each run builds a fresh plugin manager holding the core's
defaults and the selected plugins only; catalog hooks (templates, commands) see every installed plugin.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .options import Option

ENTRY_POINT_GROUP = "lmflow.plugins"
DISTRIBUTION = "lmflow"
TRACE_ENV = "LMFLOW_TRACE_HOOKS"
CORE_PLUGIN = "core"


@dataclass(frozen=True)
class PluginInfo:
    """What is known about an installed plugin without importing it."""

    name: str
    module: str
    distribution: str
    version: str

    @property
    def builtin(self) -> bool:
        return self.distribution == DISTRIBUTION

    @property
    def source(self) -> str:
        return "built-in" if self.builtin else f"installed package {self.distribution}"


def discover_plugins() -> dict[str, PluginInfo]:
    """Every plugin installed in this environment, by name, without importing any of them."""
    found: dict[str, PluginInfo] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.metadata["Name"] if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "unknown"
        info = PluginInfo(ep.name, ep.value, dist, version)
        previous = found.get(ep.name)
        if previous is not None and previous.module != info.module:
            raise PluginError(
                f"two installed packages provide a plugin named '{ep.name}' "
                f"({previous.distribution} and {info.distribution})",
                f"uninstall one of them (pip uninstall {info.distribution})",
            )
        found[ep.name] = info
    return dict(sorted(found.items()))


def import_plugin(info: PluginInfo) -> ModuleType:
    """Import a plugin's module; an import failure names the plugin and its package."""
    module_name, _, attr = info.module.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
    except Exception as exc:  # any failure inside third-party code must name the plugin
        raise PluginError(
            f"plugin '{info.name}' ({info.source}) failed to import: {type(exc).__name__}: {exc}",
            f"fix or reinstall the package {info.distribution}, or run without --plugins {info.name}",
        ) from exc
    return obj


def new_plugin_manager() -> pluggy.PluginManager:
    """An empty plugin manager that knows every lmflow hook."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def register_plugin(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    """Register ``plugin`` under ``name``; a wrong or unknown hook is an error naming the plugin."""
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin '{name}' implements a hook wrongly: {exc}", "fix the plugin") from exc
    callers = pm.get_hookcallers(plugin) or []
    wrapped = [
        caller.name
        for caller in callers
        if caller.name in hookspecs.FOLD_HOOKS | hookspecs.PER_PLUGIN_HOOKS
        and any(
            impl.plugin is plugin and (impl.wrapper or impl.hookwrapper) for impl in caller.get_hookimpls()
        )
    ]
    if wrapped:
        pm.unregister(plugin)
        kind = "fold" if wrapped[0] in hookspecs.FOLD_HOOKS else "per-plugin"
        raise PluginError(
            f"plugin '{name}' implements {wrapped[0]} as a wrapper, but {wrapped[0]} is a {kind} hook whose "
            "implementations lmflow calls one by one",
            "drop wrapper=True: take the value as an argument and return the new one",
        )
    unknown = [caller.name for caller in callers if not caller.has_spec()]
    if unknown:
        pm.unregister(plugin)
        known = hook_names()
        hints = []
        for hook in unknown:
            close = difflib.get_close_matches(hook, known, n=1)
            hints.append(f"'{hook}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise PluginError(
            f"plugin '{name}' implements unknown hook {', '.join(hints)}",
            "rename it to one of the hooks listed in lmflow_core/hookspecs.py",
        )


def hook_names() -> list[str]:
    """The name of every hook lmflow defines."""
    marker = f"{hookspecs.PROJECT}_spec"
    return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), marker))


def plugin_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """The names of the hooks ``plugin`` implements."""
    return sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])


def unknown_plugin_error(name: str, available: Iterable[str]) -> PluginError:
    """The error for ``--plugins NAME`` when no such plugin is installed."""
    available = sorted(available)
    close = difflib.get_close_matches(name, available, n=1)
    guess = f" (did you mean '{close[0]}'?)" if close else ""
    return PluginError(
        f"unknown plugin '{name}'{guess}; available: {', '.join(available) or 'none'}",
        "check the name with `lmflow plugins`, or pip install the package that provides it",
    )


@dataclass
class RunPlugins:
    """The plugin manager of one run: the core defaults plus the selected plugins, in selection order."""

    pm: pluggy.PluginManager
    names: list[str]
    infos: dict[str, PluginInfo]
    options: dict[str, list[Option]] = field(default_factory=dict)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def plugin(self, name: str) -> object:
        return self.pm.get_plugin(name)

    def versions(self) -> list[dict[str, str]]:
        """Name, version and source of every selected plugin, for the run header and run metadata."""
        out = []
        for name in self.names:
            info = self.infos.get(name)
            out.append(
                {
                    "name": name,
                    "version": info.version if info else "n/a",
                    "source": info.source if info else "python object",
                }
            )
        return out

    def per_plugin(self, hook_name: str) -> dict[str, Any]:
        """Call ``hook_name`` on each selected plugin separately: ``{plugin: result}``."""
        return {n: r for n, r in call_each(getattr(self.pm.hook, hook_name)) if n in self.names}


def select_plugins(
    names: Sequence[str], extra: Sequence[tuple[str, object]] = (), core: object | None = None
) -> RunPlugins:
    """Build the plugin manager of a run.

    Args:
        names: plugin names from ``--plugins``, looked up among the installed plugins.
        extra: ``(name, plugin_object)`` pairs registered directly (Python API and tests).
        core: the core defaults plugin; ``lmflow_core.defaults`` unless given.

    Raises:
        PluginError: unknown plugin, import failure, unknown hook, or two plugins that conflict.
    """
    if core is None:
        from . import defaults as core
    installed = discover_plugins() if names else {}
    pm = new_plugin_manager()
    register_plugin(pm, core, CORE_PLUGIN)
    infos: dict[str, PluginInfo] = {}
    chosen: list[tuple[str, object]] = []
    for name in names:
        info = installed.get(name)
        if info is None:
            raise unknown_plugin_error(name, [*installed, *(n for n, _ in extra)])
        chosen.append((name, import_plugin(info)))
        infos[name] = info
    for name, obj in extra:
        if name in infos or name == CORE_PLUGIN or name in (n for n, _ in chosen):
            raise PluginError(f"plugin name '{name}' is used twice", "give the plugin object another name")
        chosen.append((name, obj))
    # pluggy calls the most recently registered plugin first: register in reverse so that hooks run in the
    # order the plugins were named.
    for name, obj in reversed(chosen):
        register_plugin(pm, obj, name)
    plugins = RunPlugins(pm, [n for n, _ in chosen], infos)
    _check_conflicts(plugins)
    plugins.options = _collect_options(plugins)
    if os.environ.get(TRACE_ENV):
        _enable_tracing(pm)
    return plugins


def _check_conflicts(plugins: RunPlugins) -> None:
    for name, conflicts in plugins.per_plugin("declare_conflicts").items():
        for other, reason in (conflicts or {}).items():
            if other in plugins.names and other != name:
                raise PluginError(
                    f"plugins '{name}' and '{other}' cannot be combined: {reason}",
                    f"run with only one of them (--plugins without '{other}' or without '{name}')",
                )


def _collect_options(plugins: RunPlugins) -> dict[str, list[Option]]:
    declared = plugins.per_plugin("declare_options")
    options = {name: list(declared.get(name) or []) for name in plugins.names}
    seen: dict[str, str] = {}
    for name, opts in options.items():
        for opt in opts:
            if not isinstance(opt, Option):
                raise PluginError(
                    f"plugin '{name}' declared an option that is not a PluginOption: {opt!r}",
                    "fix the plugin",
                )
            flag = opt.flag_for(name)
            if flag in seen:
                raise PluginError(
                    f"plugins '{seen[flag]}' and '{name}' both declare the flag {flag}",
                    "run with only one of them or rename the option in one plugin",
                )
            seen[flag] = name
    return options


def _enable_tracing(pm: pluggy.PluginManager) -> None:
    def before(hook_name: str, hook_impls: list, kwargs: dict) -> None:
        names = ", ".join(impl.plugin_name for impl in hook_impls) or "nobody"
        print(f"[lmflow hook] {hook_name} -> {names}", file=sys.stderr)

    def after(outcome: Any, hook_name: str, hook_impls: list, kwargs: dict) -> None:
        try:
            result = outcome.get_result()
        except BaseException as exc:  # the hook raised; report it and let the caller handle it
            print(f"[lmflow hook] {hook_name} raised {type(exc).__name__}", file=sys.stderr)
            return
        print(f"[lmflow hook] {hook_name} returned {type(result).__name__}", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)


def load_catalog() -> tuple[pluggy.PluginManager, dict[str, str]]:
    """A plugin manager holding every installed plugin that imports, for the catalog hooks.

    Returns the manager and ``{plugin_name: error}`` for plugins that failed to load; those are reported by
    ``lmflow plugins`` and when selected, and are left out of the catalog so that one broken third-party
    package does not break every command.
    """
    pm = new_plugin_manager()
    broken: dict[str, str] = {}
    try:
        installed = discover_plugins()
    except PluginError as exc:
        return pm, {"(entry points)": str(exc)}
    for name, info in installed.items():
        try:
            register_plugin(pm, import_plugin(info), name)
        except PluginError as exc:
            broken[name] = str(exc)
    return pm, broken


def call_order(caller: Any) -> list[Any]:
    """The implementations of a hook in the order pluggy calls them (tryfirst, then named order, trylast)."""
    return list(reversed(caller.get_hookimpls()))


def call_each(caller: Any, skip: Any = None, **kwargs: Any) -> list[tuple[str, Any]]:
    """Call every implementation of a hook in call order: ``[(plugin_name, result), ...]``, ``None``s kept.

    For hooks whose results are combined per plugin (merged dicts that must not collide, per-plugin options).
    ``skip(impl)`` true leaves an implementation out.
    """
    if caller.name not in hookspecs.PER_PLUGIN_HOOKS:
        raise RuntimeError(f"{caller.name} is not a per-plugin hook (hookspecs.PER_PLUGIN_HOOKS)")
    trace = bool(os.environ.get(TRACE_ENV))
    results = []
    for impl in call_order(caller):
        if skip is not None and skip(impl):
            continue
        if trace:
            print(f"[lmflow hook] {caller.name} -> {impl.plugin_name}", file=sys.stderr)
        results.append((impl.plugin_name, impl.function(*[kwargs[name] for name in impl.argnames])))
    return results


def merge_each(
    results: list[tuple[str, Any]], describe: Callable[[str], str], error: type[Exception], fix: str
) -> dict[str, Any]:
    """The dicts of :func:`call_each`'s ``results`` merged; a key two plugins set differently is ``error``
    naming both (``describe(key)`` says what the key is)."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for plugin, values in results:
        for key, value in (values or {}).items():
            if key in merged and merged[key] != value:
                raise error(f"plugins '{owner[key]}' and '{plugin}' set {describe(key)} differently", fix)
            merged[key], owner[key] = value, plugin
    return merged


def fold(caller: Any, value_arg: str, **kwargs: Any) -> Any:
    """Call a *fold* hook: each implementation gets the value the previous one returned (``None`` keeps it).

    Args:
        caller: the hook, e.g. ``pm.hook.prepare_model``.
        value_arg: the argument that carries the value from one implementation to the next.
        kwargs: all the hook's arguments, ``value_arg`` included (its initial value).
    """
    if caller.name not in hookspecs.FOLD_HOOKS:
        raise RuntimeError(f"{caller.name} is not a fold hook (hookspecs.FOLD_HOOKS)")
    trace = bool(os.environ.get(TRACE_ENV))
    for impl in call_order(caller):
        if trace:
            print(f"[lmflow hook] {caller.name} -> {impl.plugin_name}", file=sys.stderr)
        result = impl.function(*[kwargs[name] for name in impl.argnames])
        if result is not None:
            kwargs[value_arg] = result
    return kwargs[value_arg]
