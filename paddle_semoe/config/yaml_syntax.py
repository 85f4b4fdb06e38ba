"""Strict YAML reading and writing for configs (YAML 1.2 core-schema scalars).

PyYAML implements YAML 1.1 scalar resolution, which surprises config users:
``lr: 1e-3`` loads as the *string* ``"1e-3"``, ``flag: no`` as ``False``, ``time: 1:20`` as the
integer 80, and ``date: 2024-01-01`` as a ``datetime.date``. The loader here resolves plain
scalars with the YAML 1.2 core schema instead:

* null:  ``~``, ``null``, ``Null``, ``NULL`` and the empty scalar
* bool:  ``true``/``True``/``TRUE`` and ``false``/``False``/``FALSE`` only
* int:   ``[-+]?[0-9]+`` (decimal, leading zeros allowed), ``0o17``, ``0x1F``
* float: ``1.5``, ``.5``, ``1.``, ``1e-3``, ``-2.5E+4``, ``.inf``, ``-.inf``, ``.nan``
* anything else is a string (``yes``, ``on``, ``2024-01-01``, ``1:20`` ...).

Duplicate keys in one mapping are an error (PyYAML silently keeps the last one).
Anchors, aliases and ``<<`` merge keys work as usual.

The dumper quotes every string that either YAML 1.1 or the 1.2 rules above would read as a
non-string, so dumped configs reload identically here and in other YAML readers.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["ConfigLoader", "ConfigDumper", "parse_yaml", "parse_scalar", "to_yaml"]

_NULL_RE = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT_RE = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_TAG = "tag:yaml.org,2002:"
_MERGE_TAG = _TAG + "merge"


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars and duplicate-key detection."""

    # Replace (not extend) the YAML 1.1 resolvers inherited from SafeLoader.
    yaml_implicit_resolvers: dict = {}

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key; the base class reports it
                    continue
                if first is not None:
                    mark = key_node.start_mark
                    raise ConfigError(
                        f"{mark.name}:{mark.line + 1}:{mark.column + 1}: duplicate key "
                        f"{key!r} (first defined on line {first.line + 1})",
                        key=str(key),
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_null(self, node: yaml.Node) -> None:
        self.construct_scalar(node)
        return None

    def construct_yaml_bool(self, node: yaml.Node) -> bool:
        return self.construct_scalar(node).lower() == "true"

    def construct_yaml_int(self, node: yaml.Node) -> int:
        text = self.construct_scalar(node)
        return int(text, 0 if text.startswith(("0o", "0x")) else 10)

    def construct_yaml_float(self, node: yaml.Node) -> float:
        text = self.construct_scalar(node).lower()
        if text.endswith(".inf"):
            return -math.inf if text.startswith("-") else math.inf
        if text == ".nan":
            return math.nan
        return float(text)


class ConfigDumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings the 1.2 rules would read as null/bool/number."""


# The dumper consults resolvers only to decide whether a string needs quotes; adding ours on
# top of its YAML 1.1 set quotes anything that is ambiguous under either schema.
for _kind, _regexp, _first in (
    ("null", _NULL_RE, ["~", "n", "N", ""]),
    ("bool", _BOOL_RE, list("tTfF")),
    ("int", _INT_RE, list("-+0123456789")),
    ("float", _FLOAT_RE, list("-+.0123456789")),
):
    ConfigLoader.add_implicit_resolver(_TAG + _kind, _regexp, _first)
    ConfigLoader.add_constructor(_TAG + _kind, getattr(ConfigLoader, f"construct_yaml_{_kind}"))
    ConfigDumper.add_implicit_resolver(_TAG + _kind, _regexp, _first)
ConfigLoader.add_implicit_resolver(_MERGE_TAG, re.compile(r"^(?:<<)$"), ["<"])


def _mark_text(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return problem if mark is None else f"{mark.name}:{mark.line + 1}:{mark.column + 1}: {problem}"


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse one YAML document with :class:`ConfigLoader`.

    Args:
        text: the YAML text.
        source: a name for error messages (usually the file path).

    Raises:
        ConfigError: on a syntax error, a duplicate key or an unsupported tag; the message
            names ``source`` with line and column.
    """
    loader = ConfigLoader(text)
    loader.name = source  # used by marks in error messages
    try:
        return loader.get_single_data()
    except ConfigError:
        raise
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in {_mark_text(err)}") from None
    finally:
        loader.dispose()


def parse_scalar(text: str, source: str = "<string>") -> Any:
    """Parse a command-line value as a YAML flow node: ``1e-3`` -> 0.001, ``[1,2]`` -> [1, 2].

    The empty string parses to ``None`` (as ``key:`` does in a YAML file).
    """
    return parse_yaml(text, source)


def to_yaml(data: Any) -> str:
    """Render plain data (dicts, lists, scalars) as block-style YAML, keeping key order."""
    return yaml.dump(
        data,
        Dumper=ConfigDumper,
        default_flow_style=False,
        sort_keys=False,
        allow_unicode=True,
        width=100,
    )
