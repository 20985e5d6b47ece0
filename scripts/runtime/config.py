"""Typed config loading for every entry point (kept rather than OmegaConf: docs/design.md): YAML -> nested dataclasses, with
`section.key=value` overrides, strict keys (an unknown key is an error naming key and file),
type conversion and checking, and a resolved-config dump."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from data.files import atomic_write


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false are booleans, so `no`, `off`, `yes` and `on` stay
    strings (`train.mixed_precision=no` is the string "no"); boolean keys still accept them."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A config file or override is wrong: the message names the key and where it came from."""


@dataclass
class TrainConfig:
    """Keys every training config has (docs/design.md)."""

    batch_size: int = 8
    lr: float = 1e-4
    max_steps: int = 1000
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "no"  # "no", "bf16" or "fp16"
    grad_accum: int = 1
    warmup_steps: int = 0
    # after warm-up: "constant", or "cosine" / "linear" decay to lr_min_ratio * lr at max_steps
    lr_decay: str = "constant"
    lr_min_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    max_nonfinite: int = 5  # stop after this many non-finite losses/gradients in a row
    num_workers: int = 0
    tensorboard: bool = False
    # the fast path (scripts.runtime.training.fast_path): torch.compile of the model (falls back to
    # eager with a warning when compilation fails), fused AdamW ("auto": on CUDA), channels-last
    compile: bool = False
    fused_adamw: str = "auto"  # auto | on | off
    channels_last: bool = False
    # shard parameters, gradients, optimizer state and the EMA over the processes (torch FSDP2,
    # `fully_shard` per U-Net block; scripts/runtime/sharding.py); checkpoints and exports hold
    # full tensors. Stage 2 only, under `accelerate launch` (any backend, gloo included)
    fsdp: bool = False

    def __post_init__(self):
        for key in ("batch_size", "max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "grad_accum"):
            if getattr(self, key) < 1:  # log_every / checkpoint_every are periods: 0 divided the step by zero
                raise ConfigError(f"train.{key} must be at least 1, got {getattr(self, key)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.fused_adamw not in ("auto", "on", "off"):
            raise ConfigError(f"train.fused_adamw must be auto, on or off, got {self.fused_adamw!r}")
        if self.lr_decay not in ("constant", "cosine", "linear"):
            raise ConfigError(f"train.lr_decay must be constant, cosine or linear, got {self.lr_decay!r}")


# ----------------------------------------------------------------------------- conversion


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, key: str, source: str):
    """Convert a YAML value (or an override string already YAML-parsed) to type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, source)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping (section), got {value!r}")
        return _build(tp, value, source, prefix=key + ".")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("()[]").split(",") if v.strip()]
            value = [_yaml(v) for v in value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        elem = args[0] if args else str
        out = [_convert(v, elem, key, source) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{source}: '{key}' has an unsupported type {_type_name(tp)}")


def _build(cls, data: dict, source: str, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(
                f"{source}: unknown config key '{prefix}{k}' (known in this section: {', '.join(sorted(names))})"
            )
    kwargs = {k: _convert(v, hints[k], prefix + k, source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------- public API


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    value = _yaml(raw) if raw != "" else ""
    return key.strip().split("."), value


def load_config(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Load `cls` (a dataclass, possibly nested) from a YAML file plus `a.b=value` overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            data = _yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    cfg = _build(cls, data, source)
    for ov in overrides:
        cfg = apply_override(cfg, ov)
    return cfg


def apply_override(cfg, text: str):
    """Return a copy of `cfg` with one `section.key=value` override applied (type-checked)."""
    keys, value = parse_override(text)
    source = f"override '{text}'"

    def _set(obj, path: list[str], prefix: str):
        names = {f.name for f in fields(obj)}
        head = path[0]
        if head not in names:
            raise ConfigError(f"{source}: unknown config key '{prefix}{head}'")
        hint = typing.get_type_hints(type(obj))[head]
        if len(path) == 1:
            new = _convert(value, hint, prefix + head, source)
        else:
            child = getattr(obj, head)
            if not is_dataclass(child):
                raise ConfigError(f"{source}: '{prefix}{head}' is not a section")
            new = _set(child, path[1:], prefix + head + ".")
        try:
            return dataclasses.replace(obj, **{head: new})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    return _set(cfg, keys, "")


def config_to_dict(cfg) -> dict:
    """Plain dict (tuples as lists) of a nested dataclass config."""

    def plain(v):
        if is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def save_config(cfg, path: str | Path) -> None:
    """Write the fully resolved config as YAML (atomically)."""
    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


__all__ = [
    "ConfigError",
    "TrainConfig",
    "apply_override",
    "config_to_dict",
    "field",
    "load_config",
    "save_config",
]
