"""``-o KEY=VALUE`` parsing and application."""

from __future__ import annotations

import pytest

from paddle_semoe.config import ConfigError, apply_overrides, parse_override


@pytest.mark.parametrize(
    "text, value",
    [
        ("a=2", 2),
        ("a=-3", -3),
        ("a=1e-3", 1e-3),
        ("a=2.5", 2.5),
        ("a=true", True),
        ("a=false", False),
        ("a=null", None),
        ("a=", None),
        ("a=hello", "hello"),
        ("a='007'", "007"),
        ("a=yes", "yes"),
        ("a=[1,2]", [1, 2]),
        ("a=[a, 1.5, true]", ["a", 1.5, True]),
        ("a={x: 1, y: [2]}", {"x": 1, "y": [2]}),
        ("a=x=y", "x=y"),
        ("a=.inf", float("inf")),
    ],
)
def test_value_types(text: str, value: object) -> None:
    parts, parsed = parse_override(text)
    assert parts == ["a"]
    assert parsed == value and type(parsed) is type(value)


def test_nested_set_creates_and_replaces_without_mutating_input() -> None:
    config = {"model": {"moe": {"top_k": 1, "num_experts": 4}}, "lr": 0.1}
    out = apply_overrides(config, ["model.moe.top_k=2", "optim.beta=0.9", "lr=1e-3", "lr=2e-3"])
    assert out == {"model": {"moe": {"top_k": 2, "num_experts": 4}}, "lr": 2e-3, "optim": {"beta": 0.9}}
    assert config["model"]["moe"]["top_k"] == 1 and "optim" not in config


def test_mapping_value_replaces_wholesale_and_delete_removes() -> None:
    config = {"m": {"a": 1, "b": 2}, "n": 1}
    assert apply_overrides(config, ["m={c: 3}", "n=__delete__"]) == {"m": {"c": 3}}


def test_origins_updated() -> None:
    origins = {"m": "f.yaml", "m.a": "f.yaml"}
    apply_overrides({"m": {"a": 1}}, ["m.a=2", "m.z={q: 1}"], origins=origins)
    assert origins["m.a"] == "-o m.a=2"
    assert origins["m.z.q"] == "-o m.z={q: 1}"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("model.moe.top_k", "model.moe.top_k"),  # no '='
        ("=3", "'=3'"),  # empty key
        ("model..top_k=3", "model..top_k"),  # empty segment
        ("model.moe.top_k=[1, 2", "model.moe.top_k"),  # bad YAML value
    ],
)
def test_malformed_override_names_it(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="malformed override") as info:
        apply_overrides({}, [text])
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "config, text, where",
    [
        ({"model": {"dim": 8}}, "model.dim.x=1", "'model.dim' is a int"),
        ({"model": {"layers": [1, 2]}}, "model.layers.0=5", "'model.layers' is a list"),
        ({"model": {"moe": None}}, "model.moe.top_k=2", "'model.moe' is null"),
    ],
)
def test_path_through_non_mapping(config: dict, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match="not a mapping") as info:
        apply_overrides(config, [text])
    assert where in str(info.value) and text in str(info.value)
