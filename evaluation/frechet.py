"""The Fréchet distance between Gaussian fits of two feature sets (FID, FVD, latent FD), and the
latent clip features the weight-free latent FD uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_fit(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and covariance [D, D] of features [N, D], in float64."""
    x = torch.as_tensor(features, dtype=torch.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"a Gaussian fit needs features [N >= 2, D]; got shape {tuple(x.shape)}")
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def frechet_from_fits(mu_a, cov_a, mu_b, cov_b) -> float:
    """d^2 = |mu_a - mu_b|^2 + tr(A) + tr(B) - 2 tr((A^1/2 B A^1/2)^1/2).

    tr((A B)^1/2) is computed as the trace of the square root of the symmetric positive
    semi-definite A^1/2 B A^1/2 (eigh, eigenvalues clamped at 0): no complex parts to discard and
    no blow-up for singular covariances (few samples, D > N), unlike scipy.linalg.sqrtm(A @ B)."""
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def frechet_distance(a, b) -> float:
    """Fréchet distance between Gaussian fits of two feature sets [N, D] (float64)."""
    return frechet_from_fits(*gaussian_fit(a), *gaussian_fit(b))


def clip_features(latents) -> torch.Tensor:
    """Whitened latents [N, C, T, h, w] -> [N, C*T*4] features: each frame's latent average-pooled
    to 2x2, so the features keep the object's coarse position in every frame (its motion)."""
    n, c, t, h, w = latents.shape
    pooled = F.adaptive_avg_pool2d(latents.float().permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w), 2)
    return pooled.reshape(n, -1)
