"""The template catalog: the conversation templates that installed plugins register, looked up by name.

Kept apart from the template engine (:mod:`lmflow_core.templates`), which knows nothing of plugins.
"""

from __future__ import annotations

from .errors import LmflowError
from .templates import Template, TemplateError, TurnTemplate


def available_templates() -> dict[str, Template]:
    """Every template that the installed plugins register, by name."""
    from .plugins import load_catalog

    pm, _broken = load_catalog()
    templates: dict[str, Template] = {}
    owners: dict[str, str] = {}
    for impl in pm.hook.register_templates.get_hookimpls():
        for template in impl.function() or []:
            if template.name in templates:
                raise LmflowError(
                    f"plugins '{owners[template.name]}' and '{impl.plugin_name}' both define the template "
                    f"'{template.name}'",
                    "uninstall one of them",
                )
            templates[template.name] = template
            owners[template.name] = impl.plugin_name
    return dict(sorted(templates.items()))


def get_template(name: str) -> Template:
    """A template by registered name, or from a ``.yaml``/``.yml``/``.json`` file path."""
    if name.endswith((".yaml", ".yml", ".json")) or "/" in name:
        return TurnTemplate.from_file(name)  # a missing file, a pipe or a device is refused there
    templates = available_templates()
    if name not in templates:
        import difflib

        close = difflib.get_close_matches(name, list(templates), n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        raise TemplateError(
            f"unknown template '{name}'{guess}; available: {', '.join(templates)}",
            "see `lmflow templates list`, or pass a template file",
        )
    return templates[name]
