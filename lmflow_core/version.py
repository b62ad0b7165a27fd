"""The version of lmflow (kept apart so that any module can name it without importing the package's facade)."""

__version__ = "0.1.0"
