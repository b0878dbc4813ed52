"""proxytune: Proxy-Tuning of autoregressive image generators (see README.md)."""

__version__ = "0.2.0"
