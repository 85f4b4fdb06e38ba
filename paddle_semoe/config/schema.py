"""Strict conversion between plain dicts (from YAML) and nested ``@dataclass`` configs.

:func:`from_dict` builds a dataclass tree from a dict and rejects anything it does not
expect: unknown keys (with a "did you mean" suggestion), missing required fields, values of
the wrong type, and values that the dataclass's own ``__post_init__`` rejects. Every error is a
one-line :class:`~paddle_semoe.config.errors.ConfigError` naming the full dotted key.

Supported field annotations (``from __future__ import annotations`` is fine; they are resolved
with :func:`typing.get_type_hints`, so config dataclasses must be defined at module level):

=================================  ==========================================================
annotation                         accepted YAML value
=================================  ==========================================================
``int``                            an integer (not a bool, not a float such as ``8.0``)
``float``                          a float or an integer (converted to float)
``bool``                           ``true``/``false`` only (no ``1``, ``"yes"``, ``"on"``)
``str``                            a string (a number must be quoted: ``'007'``)
``Any`` / ``object``               anything, unchanged
``Optional[T]`` / ``T | None``     ``null`` or a ``T``
``Union[A, B]``                    the first of A, B that accepts the value
``Literal["a", "b"]``              exactly one of the listed values
``list[T]`` / ``Sequence[T]``      a list; each item converted as ``T``
``tuple[T, ...]`` / ``tuple[A,B]`` a list (of that length for the fixed form); gives a tuple
``dict[str, T]`` / ``Mapping``     a mapping; each value converted as ``T``
an ``Enum`` subclass               a member's value (or its name)
``pathlib.Path``                   a string
a ``@dataclass``                   a mapping, converted recursively
=================================  ==========================================================

:func:`to_dict` is the inverse: ``from_dict(cls, to_dict(obj)) == obj``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Mapping as AbcMapping
from collections.abc import MutableMapping as AbcMutableMapping
from collections.abc import MutableSequence, Sequence as AbcSequence
from pathlib import Path
from typing import Any, Dict, Type, TypeVar, Union

from .errors import ConfigError

__all__ = ["from_dict", "to_dict", "suggest_key"]

T = TypeVar("T")

_NoneType = type(None)
_SEQUENCE_ORIGINS = (list, AbcSequence, MutableSequence)
_MAPPING_ORIGINS = (dict, AbcMapping, AbcMutableMapping)
#: Scalar annotation -> (accepts a value, what the error says it must be).
_SCALARS: Dict[type, typing.Tuple[typing.Callable[[Any], bool], str]] = {
    _NoneType: (lambda v: v is None, "null"),
    bool: (lambda v: isinstance(v, bool), "a bool (true or false)"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a float"),
    str: (lambda v: isinstance(v, str), "a string (quote numbers, e.g. '007')"),
}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(tp: Any) -> str:
    if tp is _NoneType:
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _value_desc(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {_short_repr(value)}"


def suggest_key(key: str, valid: typing.Iterable[str]) -> str:
    """The valid key closest to ``key`` (difflib), or ``""`` when none is close."""
    matches = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    return matches[0] if matches else ""


def _mismatch(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"config key '{path}' must be {expected}, got {_value_desc(value)}", key=path)


def _type_hints(cls: type) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as err:  # NameError for unresolvable forward references, mostly
        raise TypeError(
            f"cannot resolve the type annotations of config class {cls.__qualname__}: {err} "
            "(config dataclasses must be defined at module level with importable types)"
        ) from err


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (see the module table)."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin is typing.Annotated:
        return _convert(value, args[0], path)
    if origin is Union or origin is types.UnionType:
        return _convert_union(value, args, path)
    if origin is typing.Literal:
        return _convert_literal(value, args, path)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _convert_enum(value, tp, path)
    if tp in _SCALARS:
        accepts, expected = _SCALARS[tp]
        if not accepts(value):
            raise _mismatch(path, expected, value)
        return float(value) if tp is float else value
    if tp is Path or (isinstance(tp, type) and issubclass(tp, Path)):
        if isinstance(value, Path):
            return value
        if not isinstance(value, str):
            raise _mismatch(path, "a path string", value)
        return Path(value)

    container = origin if origin is not None else tp
    if container is tuple:
        return _convert_tuple(value, args, path)
    if container in _SEQUENCE_ORIGINS:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(path, f"a list ({_type_name(tp)})", value)
        item_tp = args[0] if args else Any
        return [_convert(item, item_tp, f"{path}[{i}]") for i, item in enumerate(value)]
    if container in _MAPPING_ORIGINS:
        if not isinstance(value, AbcMapping):
            raise _mismatch(path, f"a mapping ({_type_name(tp)})", value)
        key_tp, val_tp = (args if len(args) == 2 else (Any, Any))
        out: Dict[Any, Any] = {}
        for key, item in value.items():
            sub = _join(path, str(key))
            out[_convert(key, key_tp, sub)] = _convert(item, val_tp, sub)
        return out
    raise TypeError(f"config key '{path}': unsupported annotation {_type_name(tp)}")


def _convert_union(value: Any, args: typing.Tuple[Any, ...], path: str) -> Any:
    if value is None and _NoneType in args:
        return None
    options = [a for a in args if a is not _NoneType]
    if len(options) == 1:  # Optional[T] given a non-null value
        try:
            return _convert(value, options[0], path)
        except ConfigError as err:
            text = str(err)
            marker = f"config key '{path}' must be "
            if err.key != path or not text.startswith(marker):
                raise
            raise ConfigError(marker + "null or " + text[len(marker):], key=path) from None
    for option in options:
        try:
            return _convert(value, option, path)
        except ConfigError:
            continue
    expected = " | ".join(_type_name(a) for a in args)
    raise _mismatch(path, f"one of the types {expected}", value)


def _convert_literal(value: Any, allowed: typing.Tuple[Any, ...], path: str) -> Any:
    for option in allowed:
        if type(value) is type(option) and value == option:
            return option
    listed = ", ".join(_short_repr(a) for a in allowed)
    hint = ""
    if isinstance(value, str):
        close = suggest_key(value, [a for a in allowed if isinstance(a, str)])
        hint = f" (did you mean {close!r}?)" if close else ""
    raise ConfigError(
        f"config key '{path}' must be one of {listed}; got {_short_repr(value)}{hint}", key=path
    )


def _convert_enum(value: Any, tp: Type[enum.Enum], path: str) -> enum.Enum:
    if isinstance(value, tp):
        return value
    for member in tp:
        if (isinstance(value, str) and value == member.name) or (
            type(value) is type(member.value) and value == member.value
        ):
            return member
    listed = ", ".join(_short_repr(m.value) for m in tp)
    raise ConfigError(f"config key '{path}' must be one of {listed}; got {_short_repr(value)}", key=path)


def _convert_tuple(value: Any, args: typing.Tuple[Any, ...], path: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _mismatch(path, "a list (tuple)", value)
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(item, args[0], f"{path}[{i}]") for i, item in enumerate(value))
    if args == ((),):  # Tuple[()]
        args = ()
    if len(value) != len(args):
        raise ConfigError(
            f"config key '{path}' must be a list of {len(args)} items, got {len(value)}", key=path
        )
    return tuple(_convert(item, tp, f"{path}[{i}]") for i, (item, tp) in enumerate(zip(value, args)))


def from_dict(cls: Type[T], data: Any, path: str = "") -> T:
    """Build the dataclass ``cls`` (recursively) from the plain mapping ``data``, strictly.

    Args:
        cls: a ``@dataclass`` type (frozen or not) whose fields are annotated as in the
            module table.
        data: a mapping of field name -> value (as loaded from YAML). An instance of ``cls``
            is returned unchanged.
        path: the dotted key of ``data`` within the whole config, used in messages
            (``""`` for the root).

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: with a one-line message naming the full dotted key, for: ``data`` not a
            mapping; an unknown key (suggesting the nearest valid key); a missing required
            field; a value of the wrong type or outside a ``Literal``; or a ``ValueError`` raised
            by ``cls.__post_init__`` (re-raised prefixed with ``path``).
        TypeError: ``cls`` is not a dataclass or has annotations this module cannot handle
            (a programming error, not a config error).
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if isinstance(data, cls):
        return data
    if not isinstance(data, AbcMapping):
        where = f"config key '{path}'" if path else "the config"
        raise ConfigError(
            f"{where} must be a mapping of {cls.__name__} fields, got {_value_desc(data)}", key=path or None
        )

    hints = _type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            full = _join(path, str(key))
            close = suggest_key(str(key), names)
            if close:
                hint = f" (did you mean '{_join(path, close)}'?)"
            else:
                hint = f" (valid keys{' under ' + repr(path) if path else ''}: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{full}'{hint}", key=full)

    kwargs: Dict[str, Any] = {}
    for f in fields:
        full = _join(path, f.name)
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(
                    f"missing required config key '{full}' ({_type_name(hints.get(f.name, Any))})", key=full
                )
            continue
        kwargs[f.name] = _convert(data[f.name], hints.get(f.name, Any), full)

    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        where = f"config '{path}'" if path else "config"
        raise ConfigError(f"invalid {where}: {err}", key=path or None) from err


def to_dict(obj: Any) -> Any:
    """Convert a dataclass tree to plain YAML-ready data: dicts, lists, scalars.

    Dataclasses become dicts of their ``init`` fields in declaration order, tuples become
    lists, enums become their values and paths become strings.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, AbcMapping):
        return {key: to_dict(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(item) for item in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    return obj
