"""The diffusion model's export folder: `config.json` (architecture, diffusion settings, latent
statistics, class names, the autoencoder it was trained on) + `model.safetensors` (EMA weights).
Written as a temporary folder and renamed into place; loaded without pickle."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from data.files import missing_export_hint, sha256_file, write_export
from data.remote import is_remote
from data.stats import load_stats
from diffusion.config import DiffusionConfig, UNetConfig
from diffusion.unet3d import UNet3D
from scripts.runtime.checkpoint import differing_keys, verify_checkpoint

TEXT_ENCODER_DIR = "text_encoder"
MODEL_TYPE = "UNet3D"
FORMAT_VERSION = 1


def save_diffusion_export(folder: Path, model: UNet3D, unet_cfg: UNetConfig, diff_cfg: DiffusionConfig,
                          manifest: dict, shards: Path | None = None, fps: float | None = None,
                          text_encoder=None, super_resolution: dict | None = None) -> Path:
    """Write the export with `data.files.write_export` (the old export stays whole until the new one is).
    A text-conditioned model's encoder (a `FrozenTextEncoder`) is saved in it as `text_encoder/`, and
    its fingerprint recorded, so sampling encodes prompts exactly as training did. A super-resolution
    stage records its low-resolution input (`super_resolution`: shape, factor, stats, augmentation)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "unet": unet_cfg.to_dict(),
        "diffusion": diff_cfg.to_dict(),
        "latent": {
            "shape": manifest.get("latent_shape"),  # [C, h, w]
            "clip_len": manifest.get("clip_len"),
            "fps": fps,  # frame rate of the training clips (after the encoder's stride)
            "stats": load_stats(shards).to_dict() if shards else None,  # the folder's (or URL's) stats.json
        },
        "class_names": list(manifest.get("labels") or []),
        "autoencoder": manifest.get("autoencoder") or {},
        "shards": (str(shards) if is_remote(shards) else str(Path(shards).resolve())) if shards else None,
    }
    if super_resolution:
        meta["super_resolution"] = super_resolution
    extras = None
    if text_encoder is not None:
        meta["text_encoder"] = text_encoder.fingerprint()
        extras = {TEXT_ENCODER_DIR: text_encoder.save}
    return write_export(folder, model.state_dict(), meta, MODEL_TYPE, extras)


def load_export_text_encoder(folder: Path, meta: dict, device="cpu"):
    """The export's own text encoder (None for a model without text); an error if the folder was
    replaced by another encoder than the one recorded."""
    from diffusion.text import TextEncoderError, check_same_encoder, load_text_encoder

    recorded = meta.get("text_encoder")
    if not recorded:
        return None
    path = Path(folder) / TEXT_ENCODER_DIR
    if not path.is_dir():
        raise TextEncoderError(f"{folder}: the model is text-conditioned but {TEXT_ENCODER_DIR}/ is missing")
    enc = load_text_encoder(str(path), recorded["max_length"], device=device)
    check_same_encoder(recorded, enc.fingerprint(), f"{path} (replaced?): the export")
    return enc


def read_export_meta(folder: Path) -> dict:
    folder = Path(folder)
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{folder}: missing {p.name} (not a diffusion export folder?)"
                                    f"{missing_export_hint(folder)}")
    try:
        meta = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if meta.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{folder}: config.json says model_type={meta.get('model_type')!r}, expected {MODEL_TYPE!r} "
                         "(is this an autoencoder export?)")
    return meta


def load_diffusion_export(folder: Path, map_location="cpu") -> tuple[UNet3D, dict]:
    """(model in eval mode, config.json contents); clear errors for foreign or damaged folders."""
    folder = Path(folder)
    meta = read_export_meta(folder)
    unet_cfg = UNetConfig.from_dict(meta["unet"], source=str(folder / "config.json"))
    meta["diffusion_config"] = DiffusionConfig.from_dict(meta["diffusion"], source=str(folder / "config.json"))
    meta["unet_config"] = unet_cfg
    if sha256_file(folder / "model.safetensors") != meta.get("weights_sha256"):
        raise ValueError(f"{folder}: model.safetensors does not match the weights_sha256 in config.json")
    model = _with_weights(UNet3D(unet_cfg), folder / "model.safetensors",
                          f"{folder}: weights do not match the architecture in config.json")
    return model.to(map_location).eval(), meta


def _with_weights(model: UNet3D, weights: Path, what: str) -> UNet3D:
    """`model` with the safetensors `weights` loaded; ValueError `what: [keys]` naming the first
    missing, unexpected or differently shaped tensors."""
    state = load_file(str(weights))
    expected = model.state_dict()
    bad = sorted(set(expected) ^ set(state)) + [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if bad:
        raise ValueError(f"{what}: {bad[:5]}")
    model.load_state_dict(state)
    return model


def load_guide(path: Path, meta: dict, map_location="cpu") -> UNet3D:
    """The weaker model autoguidance (`diffusion.sampling.autoguidance`) guides with, for the export
    whose config.json contents are `meta` (as `load_diffusion_export` returns them).

    `path` is either another diffusion export (a smaller or shorter-trained model: it must share
    the latent space, the schedule and prediction, the classes, text encoder and conditioning
    inputs), or a training checkpoint folder (`DIR/checkpoints/step-N`, its EMA weights), which
    must have been written for this export's architecture and diffusion settings."""
    path = Path(path)
    if (path / "config.json").is_file():
        guide, gmeta = load_diffusion_export(path, map_location)
        g_ucfg, ucfg = gmeta["unet_config"], meta["unet_config"]
        checks = {
            "latent shape": (gmeta["latent"].get("shape"), meta["latent"].get("shape")),
            "autoencoder": ((gmeta.get("autoencoder") or {}).get("weights_sha256"),
                            (meta.get("autoencoder") or {}).get("weights_sha256")),
            "diffusion settings": (gmeta["diffusion"], meta["diffusion"]),
            "class names": (gmeta.get("class_names"), meta.get("class_names")),
            "text encoder": ((gmeta.get("text_encoder") or {}).get("weights_sha256"),
                             (meta.get("text_encoder") or {}).get("weights_sha256")),
            "conditioning inputs": ([g_ucfg.num_classes, g_ucfg.text_dim, g_ucfg.frame_conditioning, g_ucfg.self_condition],
                                    [ucfg.num_classes, ucfg.text_dim, ucfg.frame_conditioning, ucfg.self_condition]),
        }
        bad = [name for name, (a, b) in checks.items() if a != b]
        if bad:
            raise ValueError(f"--autoguide {path}: not a weaker version of this model (its {', '.join(bad)} differ); "
                             "guide with an export trained on the same latents and settings, or a checkpoint of this run")
        return guide
    weights = path / "ema.safetensors"
    if not (path / "trainer.json").is_file() or not weights.is_file():
        raise FileNotFoundError(f"--autoguide {path}: neither a diffusion export (config.json) nor a training "
                                "checkpoint folder (trainer.json + ema.safetensors, e.g. RUN/checkpoints/step-0003000)")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ValueError(f"--autoguide {path}: the checkpoint is incomplete or damaged ({problem})")
    try:
        saved = json.loads((path / "trainer.json").read_text())
    except ValueError as e:
        raise ValueError(f"{path / 'trainer.json'}: not valid JSON ({e})") from None
    for key, current in (("model_config", meta["unet"]), ("diffusion_config", meta["diffusion"])):
        if saved.get(key) != current:
            diff = differing_keys(saved.get(key), current)
            raise ValueError(f"--autoguide {path}: the checkpoint was written for another model ({key} differs: "
                             f"{', '.join(diff) or 'missing'}); pass a checkpoint of the run this export came from")
    guide = _with_weights(UNet3D(meta["unet_config"]), weights,
                          f"--autoguide {weights}: weights do not match this export's architecture")
    return guide.to(map_location).eval()
