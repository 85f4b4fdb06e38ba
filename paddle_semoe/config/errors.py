"""The single exception type raised by the config system."""

from __future__ import annotations

from typing import Optional

__all__ = ["ConfigError", "ConfigFileNotFoundError"]


class ConfigError(ValueError):
    """A config could not be loaded, merged, overridden or validated.

    The message is always a single line that names the offending key or file, so that
    ``tools/train.py`` can print ``str(err)`` and exit without a traceback.

    Attributes:
        key: dotted path of the offending key (``"model.moe.top_k"``), or ``None`` when the
            error is not about one key (e.g. a YAML syntax error).
    """

    def __init__(self, message: str, key: Optional[str] = None) -> None:
        super().__init__(" ".join(str(message).split()))  # whitespace runs and newlines: one space
        self.key = key


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """A config file (or one of its ``_base_`` files) does not exist.

    It is both a :class:`ConfigError` (hence a ``ValueError``) and a ``FileNotFoundError``,
    so either ``except`` clause catches it.
    """
