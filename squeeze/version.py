"""The package version (one place; ``squeeze.__version__`` and the file headers read it)."""

__version__ = "0.1.0.dev0"
