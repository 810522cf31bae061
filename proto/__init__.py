"""Baton proto."""
