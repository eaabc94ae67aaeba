"""Examples a user can copy (see docs/MODELS.md)."""
