"""Baton prefill worker."""
