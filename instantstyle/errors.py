"""Errors a user can cause, importable without torch or diffusers so that command lines fail fast."""

from __future__ import annotations


class GenerationError(ValueError):
    """Bad input to InstantStyle inference; the message is one line a user can act on."""


class AdapterFileError(ValueError):
    """An adapter file that does not fit the base model or cannot be read."""


class OutputPathError(ValueError):
    """A place this project must not write to (a device, a symlink, /proc), or a write that failed; one line."""
