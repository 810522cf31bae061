"""Baton router."""
