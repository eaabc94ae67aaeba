"""Bring your own model: a factory module and the pipeline that serves it (docs/MODELS.md)."""
