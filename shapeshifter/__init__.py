"""The shared library of shapeshifter's daemons and tools; imports neither daemon."""

from importlib.metadata import PackageNotFoundError, version


def _installed_version() -> str:
    """The installed distribution's version (pyproject.toml); "0+unknown" when not installed."""
    try:
        return version("shapeshifter")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _installed_version()
