"""Config system: strict keys, typed overrides, resolved dump."""

from dataclasses import dataclass, field

import pytest
import yaml

from autoencoder.config import VAEConfig
from diffusion.config import UNetConfig
from scripts.runtime.config import ConfigError, TrainConfig, load_config, save_config


@dataclass
class Run:
    model: VAEConfig = field(default_factory=VAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def test_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  channel_mult: [1, 2]\ntrain:\n  lr: 0.001\n")
    cfg = load_config(Run, p, ["train.batch_size=3", "model.mid_attention=false", "model.channel_mult=1,2,4,4"])
    assert cfg.model.channel_mult == (1, 2, 4, 4)
    assert cfg.model.downsample_factor == 8
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.batch_size == 3
    assert cfg.model.mid_attention is False
    out = tmp_path / "out" / "config.yaml"
    save_config(cfg, out)
    assert load_config(Run, out) == cfg


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.lrr"):
        load_config(Run, p)
    p.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="trian"):
        load_config(Run, p)


def test_unknown_key_in_override():
    with pytest.raises(ConfigError, match=r"model\.widht"):
        load_config(Run, None, ["model.widht=3"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.batch_size=abc", "train.batch_size.*integer"),
        ("train.lr=fast", "train.lr.*number"),
        ("model.mid_attention=maybe", "model.mid_attention.*true or false"),
        ("train.mixed_precision=fp8", "mixed_precision"),
        ("train=3", "train.*mapping|section"),
        ("train.checkpoint_every=0", r"train\.checkpoint_every must be at least 1, got 0"),
        ("train.log_every=0", r"train\.log_every must be at least 1"),
        ("train.keep_checkpoints=-1", r"train\.keep_checkpoints must be at least 1"),
        ("train.grad_accum=0", r"train\.grad_accum must be at least 1"),
    ],
)
def test_bad_types_named(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(Run, None, [override])


def test_bad_type_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"batch_size": "many"}}))
    with pytest.raises(ConfigError, match=r"c\.yaml.*train\.batch_size"):
        load_config(Run, p)


def test_model_config_json_strict():
    d = UNetConfig().to_dict()
    assert UNetConfig.from_dict(d) == UNetConfig()
    d["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        UNetConfig.from_dict(d, "export/config.json")


def test_yes_no_stay_strings_and_booleans_still_parse(tmp_path):
    """`train.mixed_precision=no` (the documented value) is the string "no", from an override and from
    an unquoted file value; boolean keys still take yes/no/on/off and true/false."""
    cfg = load_config(Run, None, ["train.mixed_precision=no", "model.mid_attention=no"])
    assert cfg.train.mixed_precision == "no" and cfg.model.mid_attention is False
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  mixed_precision: no\nmodel:\n  mid_attention: off\n")
    cfg = load_config(Run, p, ["model.mid_attention=True"])
    assert cfg.train.mixed_precision == "no" and cfg.model.mid_attention is True
    assert load_config(Run, p).model.mid_attention is False


def test_lr_schedules():
    from scripts.runtime.training import warmup_lambda

    const = warmup_lambda(10)
    assert [const(s) for s in (0, 4, 9, 500)] == [0.1, 0.5, 1.0, 1.0]
    for decay in ("cosine", "linear"):
        f = warmup_lambda(10, decay, 110, 0.1)
        values = [f(s) for s in range(110)]
        assert values[:10] == [const(s) for s in range(10)]  # the same warm-up
        assert values[9] == 1.0 and abs(values[-1] - 0.1) < 1e-9
        assert all(a >= b for a, b in zip(values[9:], values[10:]))  # decays, never rises
    assert abs(warmup_lambda(0, "cosine", 100)(49) - 0.5) < 1e-9  # half-way: half the rate
    with pytest.raises(ConfigError, match="lr_decay"):
        load_config(Run, None, ["train.lr_decay=step"])
