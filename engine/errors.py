"""Exceptions the engine raises for unusable model directories; each message names the file (and field)."""
from __future__ import annotations


class ModelFilesError(ValueError):
    """A model directory lacks a file, or a file in it is unreadable or inconsistent."""
