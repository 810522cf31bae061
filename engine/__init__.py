"""Baton engine."""
