"""gatenorm-edge: rank attention sublayers by query-key coupling and remove the weakest from GGUF models."""

__version__ = "0.1.0"
