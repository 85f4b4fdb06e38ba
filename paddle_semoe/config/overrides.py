"""Command-line overrides: ``-o model.moe.top_k=2 -o optim.lr=1e-3 -o data.shapes=[1,2]``."""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, List, Mapping, MutableMapping, Optional, Tuple

from .errors import ConfigError
from .yaml_files import DELETE, flatten_keys
from .yaml_syntax import parse_scalar

__all__ = ["parse_override", "apply_overrides"]


def parse_override(text: str) -> Tuple[List[str], Any]:
    """Split ``"a.b.c=value"`` into ``(["a", "b", "c"], parsed_value)``.

    The value is parsed as a YAML flow node with the config YAML rules (see
    :mod:`.yaml_syntax`): ``2`` -> int, ``1e-3`` -> float, ``true`` -> bool, ``null`` or an empty
    value -> None, ``[1,2]`` -> list, ``{a: 1}`` -> dict, ``'007'`` -> str, anything else -> str.
    ``__delete__`` removes the key. Only the first ``=`` splits, so values may contain ``=``.

    Raises:
        ConfigError: no ``=``, an empty key or key segment, or a value that is not valid YAML.
    """
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"malformed override {text!r}: expected KEY=VALUE, e.g. model.moe.top_k=2")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not part for part in parts):
        raise ConfigError(f"malformed override {text!r}: the key must be dotted names like a.b.c")
    try:
        value = parse_scalar(raw.strip(), source=f"override {key}")
    except ConfigError as err:
        raise ConfigError(f"malformed override {text!r}: {err}", key=key) from None
    return parts, value


def apply_overrides(
    config: Mapping[str, Any],
    overrides: Iterable[str],
    origins: Optional[MutableMapping[str, str]] = None,
) -> Dict[str, Any]:
    """Return a deep copy of ``config`` with each ``KEY=VALUE`` override applied in order.

    Missing intermediate mappings are created (a new key that the schema does not know is
    reported later by :func:`~paddle_semoe.config.schema.from_dict`). A value that is a mapping
    replaces the existing value wholesale (it is not merged). A path through a value that is
    not a mapping (a scalar, a list, or ``null``) is an error.

    Args:
        config: the loaded config (not modified).
        overrides: strings like ``"model.moe.top_k=2"``; later ones win.
        origins: if given, updated in place so each overridden key maps to ``"-o KEY=VALUE"``.

    Raises:
        ConfigError: naming the override and the key that is in the way.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'KEY=VALUE' strings, not one string")
    result: Dict[str, Any] = copy.deepcopy(dict(config))
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None and part not in node:
                child = node[part] = {}
            if not isinstance(child, MutableMapping):
                where = ".".join(parts[: depth + 1])
                what = "null" if child is None else f"a {type(child).__name__} ({child!r})"
                raise ConfigError(
                    f"cannot apply override {text!r}: '{where}' is {what}, not a mapping",
                    key=where,
                )
            node = child
        dotted = ".".join(parts)
        delete = isinstance(value, str) and value == DELETE
        if delete:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
        if origins is not None:
            for stale in [k for k in origins if k == dotted or k.startswith(dotted + ".")]:
                del origins[stale]
            if not delete:  # the key and, for a mapping, every key under it
                subs = flatten_keys(value, dotted + ".") if isinstance(value, Mapping) else []
                origins.update(dict.fromkeys([dotted, *subs], f"-o {text}"))
    return result
