"""POST: private soft-prompt transfer for LLMs."""

__version__ = "0.1.0"
