"""tokenrelay: a local streaming proxy for LLM agent fleets, with a Rust core."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tokenrelay")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
