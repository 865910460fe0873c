"""The package version, in a module of its own so that any layer can name it without
importing the package root (which re-exports the public API, the top layer)."""

__version__ = "0.1.0"
