"""lmflow: an extensible toolbox for fine-tuning, serving and measuring large language models.

The core defines the hooks (:mod:`lmflow_core.hookspecs`), finds plugins through entry points
(:mod:`lmflow_core.plugins`) and runs them (:func:`lmflow_core.train.run`). Import heavy libraries lazily: this
package is imported at every CLI start.
"""

from __future__ import annotations

from .errors import ConfigError, DataError, LmflowError, PluginError
from .options import PluginOption
from .plugins import hookimpl

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "LmflowError",
    "PluginError",
    "PluginOption",
    "__version__",
    "hookimpl",
    "run",
]


def run(config=None, **settings):
    """Fine-tune a model; see :func:`lmflow_core.train.run`."""
    from .train import run as _run

    return _run(config, **settings)
