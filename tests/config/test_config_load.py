"""load_config end to end, dump_yaml/format_config round trips."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import pytest

from paddle_semoe.config import ConfigError, dump_yaml, format_config, load_config, load_yaml_with_bases, to_dict


@dataclass(frozen=True)
class Moe:
    num_experts: int = 4
    top_k: int = 1
    gate: Literal["gshard", "switch"] = "gshard"


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.95)


@dataclass(frozen=True)
class Exp:
    name: str
    moe: Moe = field(default_factory=Moe)
    optim: Optim = field(default_factory=Optim)
    layers: List[int] = field(default_factory=lambda: [1, 2])
    notes: Dict[str, str] = field(default_factory=dict)
    resume: Optional[str] = None


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_load_with_bases_and_overrides(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "name: base\nmoe: {num_experts: 8}\noptim: {lr: 1e-4}\n")
    exp = write(tmp_path / "exp.yaml", "_base_: base.yaml\nname: exp\nmoe: {gate: switch}\n")
    cfg = load_config(Exp, exp, ["moe.top_k=2", "optim.betas=[0.8, 0.9]", "layers=[4]", "resume=null"])
    assert cfg == Exp(name="exp", moe=Moe(8, 2, "switch"), optim=Optim(1e-4, (0.8, 0.9)), layers=[4])


def test_error_says_which_file_set_the_bad_key(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "name: base\nmoe: {topk: 2}\n")
    exp = write(tmp_path / "exp.yaml", "_base_: base.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(Exp, exp)
    message = str(info.value)
    assert "unknown config key 'moe.topk' (did you mean 'moe.top_k'?)" in message
    assert "base.yaml" in message and "\n" not in message


def test_error_says_which_override_set_the_bad_key(tmp_path: Path) -> None:
    exp = write(tmp_path / "exp.yaml", "name: x\n")
    with pytest.raises(ConfigError, match=r"'moe.gate' must be one of 'gshard', 'switch'; got 'moe' \[set in -o moe.gate=moe\]"):
        load_config(Exp, exp, ["moe.gate=moe"])


def test_missing_required_from_file(tmp_path: Path) -> None:
    exp = write(tmp_path / "exp.yaml", "moe: {top_k: 1}\n")
    with pytest.raises(ConfigError, match="missing required config key 'name'"):
        load_config(Exp, exp)


def test_dump_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = Exp(
        name="1e-3",  # a string that looks like a float must stay a string
        moe=Moe(2, 2, "switch"),
        optim=Optim(lr=3e-10, betas=(0.5, 0.25)),
        layers=[],
        notes={"yes": "no", "null": "true", "empty": ""},
        resume="ckpt/step_10",
    )
    out = dump_yaml(cfg, tmp_path / "ckpt" / "config.yaml", header="resolved config")
    assert out.read_text(encoding="utf-8").startswith("# resolved config\n")
    assert load_config(Exp, out) == cfg
    assert load_yaml_with_bases(out) == to_dict(cfg)
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.yaml"]  # no temp files left


def test_dump_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    dump_yaml(Exp(name="a"), path)
    dump_yaml(Exp(name="b"), path)
    assert load_config(Exp, path).name == "b"


def test_format_config_is_readable_yaml() -> None:
    text = format_config(Exp(name="demo"), title="resolved config")
    lines = text.splitlines()
    assert lines[0] == "# resolved config"
    assert "name: demo" in lines and "moe:" in lines and "  top_k: 1" in lines
