"""_base_ inheritance, deep merge, __delete__, cycles and missing files."""

from __future__ import annotations

from pathlib import Path

import pytest

from paddle_semoe.config import (
    ConfigError,
    ConfigFileNotFoundError,
    deep_merge,
    load_yaml_with_bases,
    load_yaml_with_origins,
    parse_yaml,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_single_base_deep_merge(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "model:\n  dim: 8\n  moe: {num_experts: 4, top_k: 1}\nlr: 0.1\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nmodel:\n  moe: {top_k: 2}\n")
    assert load_yaml_with_bases(child) == {
        "model": {"dim": 8, "moe": {"num_experts": 4, "top_k": 2}},
        "lr": 0.1,
    }


def test_list_of_bases_later_wins(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "x: 1\ny: {p: 1, q: 1}\n")
    write(tmp_path / "b.yaml", "x: 2\ny: {q: 2}\n")
    child = write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\nz: 3\n")
    assert load_yaml_with_bases(child) == {"x": 2, "y": {"p": 1, "q": 2}, "z": 3}


def test_nested_bases_relative_to_including_file(tmp_path: Path) -> None:
    write(tmp_path / "common" / "root.yaml", "a: 1\nb: {c: 1}\n")
    write(tmp_path / "common" / "mid.yaml", "_base_: root.yaml\nb: {d: 2}\n")
    leaf = write(tmp_path / "exp" / "deep" / "leaf.yaml", "_base_: ../../common/mid.yaml\na: 5\n")
    assert load_yaml_with_bases(leaf) == {"a": 5, "b": {"c": 1, "d": 2}}


def test_non_mapping_replaces_and_lists_are_not_concatenated(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "l: [1, 2, 3]\nm: {x: 1}\ns: 1\n")
    child = write(tmp_path / "b.yaml", "_base_: a.yaml\nl: [9]\nm: 7\ns: {y: 2}\n")
    assert load_yaml_with_bases(child) == {"l": [9], "m": 7, "s": {"y": 2}}


def test_delete_marker_removes_inherited_key(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "model: {dim: 8, dropout: 0.1}\nextra: {k: 1}\n")
    child = write(tmp_path / "b.yaml", "_base_: a.yaml\nmodel: {dropout: __delete__}\nextra: __delete__\nnew: __delete__\n")
    assert load_yaml_with_bases(child) == {"model": {"dim": 8}}


def test_deep_merge_does_not_mutate_inputs() -> None:
    base = {"a": {"b": 1}}
    update = {"a": {"c": 2}}
    merged = deep_merge(base, update)
    assert merged == {"a": {"b": 1, "c": 2}}
    assert base == {"a": {"b": 1}} and update == {"a": {"c": 2}}


def test_empty_file_is_empty_mapping(tmp_path: Path) -> None:
    assert load_yaml_with_bases(write(tmp_path / "e.yaml", "# nothing\n")) == {}


def test_cycle_names_the_files(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "_base_: b.yaml\nx: 1\n")
    write(tmp_path / "b.yaml", "_base_: c.yaml\n")
    write(tmp_path / "c.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as info:
        load_yaml_with_bases(tmp_path / "a.yaml")
    message = str(info.value)
    assert "a.yaml" in message and "b.yaml" in message and "c.yaml" in message
    assert "\n" not in message


def test_self_include_is_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "self.yaml", "_base_: ./self.yaml\n")
    with pytest.raises(ConfigError, match="cycle.*self.yaml"):
        load_yaml_with_bases(tmp_path / "self.yaml")


def test_diamond_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "root.yaml", "r: 1\n")
    write(tmp_path / "l.yaml", "_base_: root.yaml\nl: 1\n")
    write(tmp_path / "r.yaml", "_base_: root.yaml\nrr: 1\n")
    top = write(tmp_path / "top.yaml", "_base_: [l.yaml, r.yaml]\n")
    assert load_yaml_with_bases(top) == {"r": 1, "l": 1, "rr": 1}


def test_missing_base_names_path_and_referrer(tmp_path: Path) -> None:
    child = write(tmp_path / "child.yaml", "_base_: nope/missing.yaml\n")
    with pytest.raises(ConfigFileNotFoundError) as info:
        load_yaml_with_bases(child)
    message = str(info.value)
    assert "missing.yaml" in message and "child.yaml" in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_missing_top_level_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        load_yaml_with_bases(tmp_path / "absent.yaml")


def test_bad_base_value(tmp_path: Path) -> None:
    child = write(tmp_path / "c.yaml", "_base_: {a: 1}\n")
    with pytest.raises(ConfigError, match="_base_"):
        load_yaml_with_bases(child)


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level"):
        load_yaml_with_bases(write(tmp_path / "l.yaml", "- 1\n- 2\n"))


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+") as info:
        load_yaml_with_bases(bad)
    assert "\n" not in str(info.value)


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    bad = write(tmp_path / "dup.yaml", "model:\n  dim: 1\n  dim: 2\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:3:\d+: duplicate key 'dim'"):
        load_yaml_with_bases(bad)


def test_yaml_12_scalars() -> None:
    data = parse_yaml("a: 1e-3\nb: no\nc: 2024-01-01\nd: 1:20\ne: .inf\nf: 0x10\ng: ~\nh: True\n")
    assert data == {"a": 0.001, "b": "no", "c": "2024-01-01", "d": "1:20", "e": float("inf"), "f": 16, "g": None, "h": True}


def test_origins_track_the_file_that_set_each_key(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "m: {x: 1, y: 1}\nk: 1\n")
    child = write(tmp_path / "b.yaml", "_base_: a.yaml\nm: {y: 2}\nk: __delete__\n")
    data, origins = load_yaml_with_origins(child)
    assert data == {"m": {"x": 1, "y": 2}}
    assert origins["m.x"].endswith("a.yaml")
    assert origins["m.y"].endswith("b.yaml")
    assert "k" not in origins
