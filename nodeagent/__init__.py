"""shapeshifter node agent: one per GPU server."""

__version__ = "0.1.0"
