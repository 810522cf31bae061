"""Baton embedding worker."""
