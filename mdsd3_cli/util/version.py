"""The package version: written here only (pyproject.toml reads it, as setuptools' dynamic version)."""

__version__ = "0.1.0"
