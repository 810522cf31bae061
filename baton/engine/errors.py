"""Exceptions the engine raises for unusable model directories; each message names the file (and field)."""
from __future__ import annotations


class ModelFilesError(ValueError):
    """A model directory lacks a file, or a file in it is unreadable or inconsistent."""


class InvalidRequestError(ValueError):
    """A request the engine can never serve as given (empty prompt, too long, bad parameters)."""


class NoCapacityError(RuntimeError):
    """The engine cannot take this request right now; another worker, or a later retry, may."""
