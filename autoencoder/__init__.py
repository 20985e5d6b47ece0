"""Stage 1: frame-wise KL autoencoder (FrameVAE), its losses, and chunked video encode/decode."""

from autoencoder.config import LossConfig, VAEConfig
from autoencoder.distributions import DiagonalGaussian
from autoencoder.losses import PatchDiscriminator, VAELoss, adaptive_weight, build_lpips, hinge_d_loss
from autoencoder.model import MODEL_TYPE, FrameVAE, weights_hash
from autoencoder.video import decode_video, encode_video, encode_video_posterior

__all__ = [
    "MODEL_TYPE",
    "DiagonalGaussian",
    "FrameVAE",
    "LossConfig",
    "PatchDiscriminator",
    "VAEConfig",
    "VAELoss",
    "adaptive_weight",
    "build_lpips",
    "decode_video",
    "encode_video",
    "encode_video_posterior",
    "hinge_d_loss",
    "weights_hash",
]
