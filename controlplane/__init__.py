"""Baton controlplane."""
