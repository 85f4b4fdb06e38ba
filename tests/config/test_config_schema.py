"""Strict dict -> dataclass conversion and its error messages."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import pytest

from paddle_semoe.config import ConfigError, from_dict, to_dict


class Act(enum.Enum):
    GELU = "gelu"
    RELU = "relu"


@dataclass(frozen=True)
class Moe:
    num_experts: int
    top_k: int = 1
    capacity_factor: float = 1.25
    gate: Literal["gshard", "switch", "naive"] = "gshard"
    use_aux_loss: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")


@dataclass
class Model:
    dim: int = 16
    moe: Moe = field(default_factory=lambda: Moe(num_experts=4))
    dropout: Optional[float] = None
    act: Act = Act.GELU
    layer_sizes: List[int] = field(default_factory=lambda: [1, 2])
    shape: Tuple[int, ...] = (2, 2)
    pair: Tuple[str, int] = ("a", 1)
    tags: Dict[str, float] = field(default_factory=dict)
    extra_moe: Optional[Moe] = None
    id_or_name: Union[int, str] = 0
    blob: Any = None
    out_dir: Path = Path("out")
    name: str = "gpt"


@dataclass
class Root:
    model: Model = field(default_factory=Model)
    seed: int = 0
    experts_per_stage: List[Moe] = field(default_factory=list)


def test_builds_nested_with_coercion_and_defaults() -> None:
    cfg = from_dict(
        Root,
        {
            "model": {
                "dim": 32,
                "moe": {"num_experts": 8, "top_k": 2, "capacity_factor": 2},
                "dropout": 0,
                "act": "relu",
                "shape": [1, 2, 3],
                "pair": ["b", 3],
                "tags": {"x": 1},
                "extra_moe": {"num_experts": 2},
                "id_or_name": "foo",
                "blob": {"anything": [1]},
                "out_dir": "/tmp/x",
            },
            "experts_per_stage": [{"num_experts": 2}, {"num_experts": 4, "top_k": 4}],
        },
    )
    assert cfg.model.moe == Moe(num_experts=8, top_k=2, capacity_factor=2.0)
    assert isinstance(cfg.model.moe.capacity_factor, float)
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.model.act is Act.RELU
    assert cfg.model.shape == (1, 2, 3) and cfg.model.pair == ("b", 3)
    assert cfg.model.tags == {"x": 1.0}
    assert cfg.model.extra_moe == Moe(num_experts=2)
    assert cfg.model.id_or_name == "foo"
    assert cfg.model.out_dir == Path("/tmp/x")
    assert cfg.experts_per_stage[1].top_k == 4
    assert cfg.seed == 0 and cfg.model.name == "gpt"


def test_empty_mapping_gives_defaults() -> None:
    assert from_dict(Root, {}) == Root()


def test_to_dict_round_trip() -> None:
    cfg = from_dict(Root, {"model": {"act": "relu", "extra_moe": {"num_experts": 3}}, "seed": 7})
    plain = to_dict(cfg)
    assert plain["model"]["act"] == "relu" and plain["model"]["shape"] == [2, 2]
    assert plain["model"]["out_dir"] == "out"
    assert from_dict(Root, plain) == cfg


# Each case: (input dict, substring that must appear; the dotted key is always in it).
MALFORMED = [
    pytest.param({"model": {"moe": {"num_experts": 4, "topk": 2}}}, "unknown config key 'model.moe.topk' (did you mean 'model.moe.top_k'?)", id="unknown-nested-suggest"),
    pytest.param({"sed": 1}, "unknown config key 'sed' (did you mean 'seed'?)", id="unknown-root-suggest"),
    pytest.param({"model": {"zzzz": 1}}, "unknown config key 'model.zzzz' (valid keys under 'model': dim, moe,", id="unknown-no-suggestion"),
    pytest.param({"model": {"dim": "16"}}, "config key 'model.dim' must be an int, got str '16'", id="int-from-str"),
    pytest.param({"model": {"dim": 16.0}}, "config key 'model.dim' must be an int, got float 16.0", id="int-from-float"),
    pytest.param({"model": {"dim": True}}, "config key 'model.dim' must be an int, got bool True", id="int-from-bool"),
    pytest.param({"model": {"moe": {"num_experts": 4, "use_aux_loss": "yes"}}}, "config key 'model.moe.use_aux_loss' must be a bool", id="bool-from-str"),
    pytest.param({"model": {"moe": {"num_experts": 4, "use_aux_loss": 1}}}, "config key 'model.moe.use_aux_loss' must be a bool", id="bool-from-int"),
    pytest.param({"model": {"moe": {"num_experts": 4, "capacity_factor": "1.5"}}}, "config key 'model.moe.capacity_factor' must be a float", id="float-from-str"),
    pytest.param({"model": {"name": 7}}, "config key 'model.name' must be a string", id="str-from-int"),
    pytest.param({"model": {"moe": {"num_experts": 4, "gate": "swich"}}}, "config key 'model.moe.gate' must be one of 'gshard', 'switch', 'naive'; got 'swich' (did you mean 'switch'?)", id="bad-literal"),
    pytest.param({"model": {"act": "tanh"}}, "config key 'model.act' must be one of 'gelu', 'relu'; got 'tanh'", id="bad-enum"),
    pytest.param({"model": {"moe": {"top_k": 2}}}, "missing required config key 'model.moe.num_experts' (int)", id="missing-required"),
    pytest.param({"experts_per_stage": [{"num_experts": 2}, {}]}, "missing required config key 'experts_per_stage[1].num_experts'", id="missing-in-list"),
    pytest.param({"model": {"moe": {"num_experts": 2, "top_k": 3}}}, "invalid config 'model.moe': top_k=3 must be in [1, num_experts=2]", id="post-init"),
    pytest.param({"experts_per_stage": [{"num_experts": 2, "top_k": 0}]}, "invalid config 'experts_per_stage[0]': top_k=0", id="post-init-in-list"),
    pytest.param({"model": {"layer_sizes": 3}}, "config key 'model.layer_sizes' must be a list", id="list-from-int"),
    pytest.param({"model": {"layer_sizes": [1, "x"]}}, "config key 'model.layer_sizes[1]' must be an int", id="list-item"),
    pytest.param({"model": {"pair": ["a"]}}, "config key 'model.pair' must be a list of 2 items, got 1", id="fixed-tuple-length"),
    pytest.param({"model": {"tags": {"lr": "high"}}}, "config key 'model.tags.lr' must be a float", id="dict-value"),
    pytest.param({"model": {"tags": [1]}}, "config key 'model.tags' must be a mapping", id="dict-from-list"),
    pytest.param({"model": {"moe": [1, 2]}}, "config key 'model.moe' must be a mapping of Moe fields, got list", id="section-from-list"),
    pytest.param({"model": {"dropout": "x"}}, "config key 'model.dropout' must be null or a float, got str 'x'", id="optional-wrong"),
    pytest.param({"model": {"id_or_name": 1.5}}, "config key 'model.id_or_name' must be one of the types int | str", id="union-wrong"),
    pytest.param({"model": {"extra_moe": {"num_experts": 2, "bogus": 1}}}, "unknown config key 'model.extra_moe.bogus'", id="unknown-under-optional"),
]


@pytest.mark.parametrize("data, expected", MALFORMED)
def test_malformed_config_message_names_the_key(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(Root, data)
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message
    assert info.value.key is not None and info.value.key in message
    assert isinstance(info.value, ValueError)


def test_root_post_init_error_has_no_path_prefix() -> None:
    @dataclass
    class Bad:  # no string annotations resolvable issue: module has `from __future__`,
        x: "int" = 0  # but get_type_hints resolves builtins from any scope

        def __post_init__(self) -> None:
            raise ValueError("x is never valid")

    with pytest.raises(ConfigError, match=r"^invalid config: x is never valid$"):
        from_dict(Bad, {})


def test_root_must_be_mapping() -> None:
    with pytest.raises(ConfigError, match="the config must be a mapping of Root fields, got list"):
        from_dict(Root, [1])


def test_not_a_dataclass_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        from_dict(dict, {})
