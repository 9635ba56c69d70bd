"""Data sources: one module per provider, each exposing ``SOURCE``."""
