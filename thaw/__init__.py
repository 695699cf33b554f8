"""thaw: GPU inference that scales up in seconds."""

__version__ = "0.1.0"
