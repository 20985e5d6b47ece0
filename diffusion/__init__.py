"""Stage 2: factorized 3D U-Net over video latents and the Gaussian diffusion process that trains it."""

from diffusion.config import DiffusionConfig, UNetConfig
from diffusion.process import GaussianDiffusion
from diffusion.unet3d import MODEL_TYPE, UNet3D

__all__ = ["MODEL_TYPE", "DiffusionConfig", "GaussianDiffusion", "UNet3D", "UNetConfig"]
