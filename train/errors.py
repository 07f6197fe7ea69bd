"""Training errors a user can act on, importable without torch so the command line can report them early."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (or run folder) that cannot be written, or resumed into this run; the message is one line."""


class ConfigError(ValueError):
    """A config value that cannot work; the message is one actionable line."""
