"""mergesearch: automatic search for model-merge recipes."""

__version__ = "0.1.0"
