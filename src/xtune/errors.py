"""Exceptions meant for people: the CLI prints their message without a stack trace."""


class XtuneError(Exception):
    """Base class. The message names the file, line or key at fault and says how to fix it."""


class ConfigError(XtuneError):
    """A config file or override is invalid."""


class DataError(XtuneError):
    """A dataset file or record is malformed."""


class ModelNotFoundError(XtuneError):
    """A model id or path could not be resolved to a local folder."""


class CheckpointError(XtuneError):
    """A checkpoint is missing, incomplete or does not fit the model."""


class TrainingError(XtuneError):
    """Training cannot go on (e.g. the loss became NaN)."""


def short_repr(value: object, limit: int = 80) -> str:
    """repr() of a value for a message, cut to `limit` characters (and safe for integers too long to print)."""
    try:
        text = repr(value)
    except ValueError:
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
