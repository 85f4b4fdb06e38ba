"""One-call config entry point: file (with ``_base_``) + ``-o`` overrides -> typed dataclass."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Type, TypeVar, Union

from .errors import ConfigError
from .overrides import apply_overrides
from .schema import from_dict
from .yaml_files import load_yaml_with_origins

__all__ = ["load_config"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_INDEX_RE = re.compile(r"\[\d+\]")


def _origin_of(key: Optional[str], origins: Mapping[str, str]) -> str:
    """The file or override that set ``key`` (list indices ignored), or ``""``."""
    return origins.get(_INDEX_RE.sub("", key), "") if key else ""


def load_config(cls: Type[T], path: Union[str, Path], overrides: Iterable[str] = ()) -> T:
    """Load ``path`` (resolving ``_base_`` files), apply ``KEY=VALUE`` overrides, build ``cls``.

    Args:
        cls: the root config dataclass.
        path: the YAML file.
        overrides: ``-o`` strings such as ``"model.moe.top_k=2"``, applied in order.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: one line naming the key (and, when known, the file or override that set
            it, e.g. ``unknown config key 'model.moe.topk' (did you mean 'model.moe.top_k'?)
            [set in configs/base.yaml]``). ``ConfigFileNotFoundError`` for missing files.
    """
    data, origins = load_yaml_with_origins(path)
    data = apply_overrides(data, list(overrides), origins=origins)
    try:
        config = from_dict(cls, data)
    except ConfigError as err:
        origin = _origin_of(err.key, origins)
        if not origin:
            raise
        raise ConfigError(f"{err} [set in {origin}]", key=err.key) from err
    logger.debug("loaded config %s from %s", type(config).__name__, path)
    return config
