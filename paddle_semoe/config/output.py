"""Writing resolved configs: YAML text for logs, atomic YAML files beside checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

from paddle_semoe.io.files import write_atomic

from .schema import to_dict
from .yaml_syntax import to_yaml

__all__ = ["dump_yaml", "format_config"]

logger = logging.getLogger(__name__)


def format_config(obj: Any, title: Optional[str] = None) -> str:
    """Render a config (dataclass tree or plain dict) as YAML text, for printing on rank 0.

    Args:
        obj: the config.
        title: an optional first line (e.g. ``"resolved config"``), written as a YAML comment.
    """
    text = to_yaml(to_dict(obj))
    return f"# {title}\n{text}" if title else text


def dump_yaml(obj: Any, path: Union[str, Path], header: Optional[str] = None) -> Path:
    """Write a config as YAML to ``path`` atomically: temp file, flush, fsync, rename.

    Readers never see a partial file: either the old content or the new one. The written file
    reloads with :func:`~paddle_semoe.config.loader.load_config` to an equal config.

    Args:
        obj: a dataclass tree or plain dict.
        path: destination file; its directory is created if missing.
        header: optional comment line written first (e.g. the command line that produced it).

    Returns:
        The destination path.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, format_config(obj, title=header).encode("utf-8"))
    logger.debug("wrote config %s", dest)
    return dest
