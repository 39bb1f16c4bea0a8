"""tokenrelay: a local streaming proxy for LLM agent fleets, with a Rust core."""

# The Rust core's version, Cargo.toml's, which maturin also writes into the package metadata (tests/test_cli.py
# checks they agree): read here for free, where `importlib.metadata.version()` took ~90 ms of every command's
# start-up.
from tokenrelay._core import __version__

__all__ = ["__version__"]
