"""YAML config files with ``_base_`` inheritance and deep merging.

A config file may name one or more base files::

    _base_: ../base/gpt_tiny.yaml          # or a list: [a.yaml, b.yaml]
    model:
      moe:
        top_k: 2                           # overrides the base's value
        capacity_factor: __delete__        # removes the key the base set

Rules:

* Base paths are relative to the directory of the file that names them (absolute paths and
  ``~`` work too). Bases are loaded recursively, merged left to right, and then the file's own
  keys are merged on top: later always wins.
* Merging is recursive for mappings: when both sides hold a mapping under a key, the two are
  merged key by key. Any other value (scalar, list, ``null``, or a mapping replacing a scalar)
  replaces the earlier value wholesale; lists are never concatenated.
* The string :data:`DELETE` (``"__delete__"``) as a value removes that key from the merged
  result (deleting a key that no base set is a no-op). Use it to drop an inherited optional
  section, or to replace an inherited mapping outright: delete it in one file and set the new
  mapping in a file that inherits from it.
* Each file is resolved on its own first: its :data:`DELETE` markers act on what *its* bases
  set, never on keys of a sibling base listed beside it in another file.
* ``_base_`` is only recognised at the top level of a file.
* A file that includes itself directly or indirectly is an error naming the chain of files.

Alongside the merged dict, :func:`load_yaml_with_origins` reports which file last set each
dotted key, so validation errors can say where a bad key came from.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from .errors import ConfigError, ConfigFileNotFoundError
from .yaml_syntax import parse_yaml

__all__ = [
    "BASE_KEY",
    "DELETE",
    "deep_merge",
    "load_yaml_with_bases",
    "load_yaml_with_origins",
    "flatten_keys",
]

logger = logging.getLogger(__name__)

BASE_KEY = "_base_"
"""Top-level key naming the base file(s) of a config file."""

DELETE = "__delete__"
"""Value that removes a key during a merge (from a file or a ``-o key=__delete__`` override)."""

PathLike = Union[str, Path]
Origins = Dict[str, str]


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    """Return ``base`` with ``update`` merged on top (the module's rules); neither input is
    modified. Mappings from ``update`` merge onto an empty one, so nested :data:`DELETE` markers
    never leak into the result."""
    merged: Dict[str, Any] = dict(base)
    for key, value in update.items():
        if isinstance(value, str) and value == DELETE:
            merged.pop(key, None)
        elif isinstance(value, Mapping):
            previous = merged.get(key)
            merged[key] = deep_merge(previous if isinstance(previous, Mapping) else {}, value)
        else:
            merged[key] = value
    return merged


def flatten_keys(data: Mapping[str, Any], prefix: str = "") -> List[str]:
    """All dotted key paths in ``data``, mappings included (``["a", "a.b", "a.b.c"]``)."""
    keys: List[str] = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, Mapping):
            keys.extend(flatten_keys(value, dotted + "."))
    return keys


def _combine_origins(merged: Mapping[str, Any], old: Origins, new: Mapping[str, str]) -> Origins:
    """Origins of the keys of ``merged``: from ``new`` where it sets the key, else from ``old``."""
    return {key: new.get(key, old.get(key, "")) for key in flatten_keys(merged)}


def _display(path: Path) -> str:
    """A short, stable way to name a file in messages: relative to cwd when possible."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _base_list(value: Any, source: str) -> List[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(
        f"{source}: '{BASE_KEY}' must be a file path or a list of file paths, got {value!r}",
        key=BASE_KEY,
    )


def _load(path: Path, stack: Tuple[Path, ...], referrer: Optional[Path]) -> Tuple[Dict[str, Any], Origins]:
    as_named = Path(os.path.abspath(path.expanduser()))  # bases are relative to this (symlinks kept)
    resolved = as_named.resolve()  # identity for cycle detection
    if resolved in stack:
        chain = " -> ".join(_display(p) for p in stack[stack.index(resolved):] + (resolved,))
        raise ConfigError(f"config {BASE_KEY} cycle: {chain}")
    if not resolved.is_file():
        where = f" (referenced by {BASE_KEY} in {_display(referrer)})" if referrer else ""
        kind = "is not a file" if resolved.exists() else "not found"
        raise ConfigFileNotFoundError(f"config file {kind}: {_display(resolved)}{where}")
    source = _display(resolved)
    try:
        text = resolved.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {source}: {err}") from None
    data = parse_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config file must hold a mapping at the top level, got {type(data).__name__}")

    own = dict(data)
    merged: Dict[str, Any] = {}
    origins: Origins = {}
    if BASE_KEY in own:
        for base in _base_list(own.pop(BASE_KEY), source):
            base_path = as_named.parent / Path(base).expanduser()  # an absolute path stays as is
            base_data, base_origins = _load(base_path, stack + (resolved,), resolved)
            merged = deep_merge(merged, base_data)
            origins = _combine_origins(merged, origins, base_origins)
    merged = deep_merge(merged, own)
    origins = _combine_origins(merged, origins, {key: source for key in flatten_keys(own)})
    logger.debug("loaded config file %s", source)
    return merged, origins


def load_yaml_with_origins(path: PathLike) -> Tuple[Dict[str, Any], Origins]:
    """Load a config file, resolving ``_base_`` files, and report where each key came from.

    Returns:
        ``(config, origins)``: the merged plain dict, and a dict mapping every dotted key path
        of ``config`` to the file (as displayed in messages) that last set it.

    Raises:
        ConfigFileNotFoundError: the file or a base is missing (names the file that referenced it).
        ConfigError: YAML syntax error, duplicate key, bad ``_base_`` value, a non-mapping top
            level, or a ``_base_`` cycle (the message lists the files in the cycle).
    """
    return _load(Path(path), (), None)


def load_yaml_with_bases(path: PathLike) -> Dict[str, Any]:
    """Load a config file into a plain dict, resolving ``_base_`` files (see module docs)."""
    return load_yaml_with_origins(path)[0]
