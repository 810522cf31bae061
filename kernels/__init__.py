"""Baton kernels."""
