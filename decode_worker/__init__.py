"""Baton decode worker."""
