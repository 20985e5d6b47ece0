"""The diffusion model's export folder: `config.json` (architecture, diffusion settings, latent
statistics, class names, the autoencoder it was trained on) + `model.safetensors` (EMA weights).
Written as a temporary folder and renamed into place; loaded without pickle."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffusion.config import DiffusionConfig, UNetConfig
from diffusion.unet3d import UNet3D
from scripts.runtime.checkpoint import sha256_file

MODEL_TYPE = "UNet3D"
FORMAT_VERSION = 1


def save_diffusion_export(folder: Path, model: UNet3D, unet_cfg: UNetConfig, diff_cfg: DiffusionConfig,
                          manifest: dict, shards: Path | None = None, fps: float | None = None) -> Path:
    """Write the export; an existing export at `folder` is replaced only once the new one is complete."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"model_type": MODEL_TYPE})
        stats = json.loads((Path(shards) / "stats.json").read_text()) if shards else None
        meta = {
            "model_type": MODEL_TYPE,
            "format_version": FORMAT_VERSION,
            "unet": unet_cfg.to_dict(),
            "diffusion": diff_cfg.to_dict(),
            "latent": {
                "shape": manifest.get("latent_shape"),  # [C, h, w]
                "clip_len": manifest.get("clip_len"),
                "fps": fps,  # frame rate of the training clips (after the encoder's stride)
                "stats": stats,
            },
            "class_names": list(manifest.get("labels") or []),
            "autoencoder": manifest.get("autoencoder") or {},
            "shards": str(Path(shards).resolve()) if shards else None,
            "weights_sha256": sha256_file(tmp / "model.safetensors"),
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_export_meta(folder: Path) -> dict:
    folder = Path(folder)
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{folder}: missing {p.name} (not a diffusion export folder?)")
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
    model = UNet3D(unet_cfg)
    state = load_file(str(folder / "model.safetensors"))
    expected = model.state_dict()
    bad = sorted(set(expected) ^ set(state)) + [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if bad:
        raise ValueError(f"{folder}: weights do not match the architecture in config.json: {bad[:5]}")
    model.load_state_dict(state)
    return model.to(map_location).eval(), meta


def latent_stats_tensors(meta: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    stats = (meta.get("latent") or {}).get("stats")
    if not stats:
        return None
    return torch.tensor(stats["mean"], dtype=torch.float32), torch.tensor(stats["std"], dtype=torch.float32)
