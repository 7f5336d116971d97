"""nanoalign: a minimal, readable reference implementation of LLM preference alignment."""
__version__ = "0.1.0"
