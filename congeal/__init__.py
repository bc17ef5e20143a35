"""The ``congeal`` command: ``align`` and ``apply`` (the core), ``serve`` and ``demo`` (the service)."""

__all__ = ["__version__"]

# The one place the version is written: pyproject.toml reads it from here ([tool.setuptools.dynamic]),
# and the CLI's --version and the API's OpenAPI document show it.
__version__ = "0.1.0"
