"""Typed, strict configs: YAML files with ``_base_`` inheritance, ``-o`` overrides, dataclasses.

Typical use (``tools/train.py -c configs/x.yaml -o model.moe.top_k=2``)::

    from paddle_semoe.config import ConfigError, dump_yaml, format_config, load_config

    try:
        cfg = load_config(TrainConfig, args.config, args.override)
    except ConfigError as err:          # one line, names the key and where it was set
        sys.exit(f"error: {err}")
    logger.info("%s", format_config(cfg, title="resolved config"))
    dump_yaml(cfg, ckpt_dir / "config.yaml")

Modules: :mod:`.yaml_syntax` (strict YAML 1.2 scalars), :mod:`.yaml_files` (``_base_`` and
deep merge, ``__delete__``), :mod:`.overrides` (``KEY=VALUE``), :mod:`.schema` (dict <->
dataclass), :mod:`.output` (printing, atomic dump), :mod:`.loader` (the one-call entry).
"""

from .errors import ConfigError, ConfigFileNotFoundError
from .loader import load_config
from .output import dump_yaml, format_config
from .overrides import apply_overrides, parse_override
from .schema import from_dict, suggest_key, to_dict
from .yaml_files import BASE_KEY, DELETE, deep_merge, load_yaml_with_bases, load_yaml_with_origins
from .yaml_syntax import parse_scalar, parse_yaml

__all__ = [
    "BASE_KEY",
    "DELETE",
    "ConfigError",
    "ConfigFileNotFoundError",
    "apply_overrides",
    "deep_merge",
    "dump_yaml",
    "format_config",
    "from_dict",
    "load_config",
    "load_yaml_with_bases",
    "load_yaml_with_origins",
    "parse_override",
    "parse_scalar",
    "parse_yaml",
    "suggest_key",
    "to_dict",
]
