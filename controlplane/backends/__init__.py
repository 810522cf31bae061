"""Capacity backends: kubernetes, ray, local."""
