"""Errors a user can cause, and how they are reported.

Anything the user can fix (a bad path, a malformed record, an unknown plugin, an out-of-range option) raises
:class:`LmflowError`. The CLI prints it as one line naming the problem and the fix and exits non-zero; the
traceback is shown only with ``--debug``. Everything else is a bug or an environment failure and is reported
the same way, with the exception type, so that a user never has to read a traceback to know what happened.
"""

from __future__ import annotations


class LmflowError(Exception):
    """A problem the user can fix. ``str(error)`` is the one-line message shown by the CLI."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        self.message = message.rstrip(".")
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The problem, then the fix, on one line."""
        if not self.hint:
            return self.message
        hint = self.hint[0].upper() + self.hint[1:] if self.hint[0].islower() else self.hint
        return f"{self.message}. {hint.rstrip('.')}."


class ConfigError(LmflowError):
    """The run configuration is invalid (bad option value, unknown key, inconsistent options)."""

    exit_code = 2

    @classmethod
    def collect(cls, problems: list[str], what: str = "run configuration") -> ConfigError:
        """One error that names every problem found, so a user fixes them all in one go."""
        if len(problems) == 1:
            return cls(problems[0])
        listed = "; ".join(f"({i}) {p.rstrip('.')}" for i, p in enumerate(problems, 1))
        return cls(f"{len(problems)} problems in the {what}: {listed}")


class DataError(LmflowError):
    """A dataset file or record is malformed. The message names the file and the record."""

    exit_code = 2


class PluginError(LmflowError):
    """A plugin is unknown, failed to import, implements a hook wrongly or conflicts with another."""

    exit_code = 2
