"""Errors that reach the user as one clear line from ``train.py`` (no traceback)."""


class ConfigError(ValueError):
    """A command-line or configuration value is invalid; the message names the argument."""


class DataError(ValueError):
    """A data set is missing, unreadable or holds invalid values; the message names the file."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the first bad step."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, unsafe to load or of another run; the message
    names the file."""
