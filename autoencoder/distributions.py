"""Diagonal Gaussian posterior q(z|x) of the VAE: sampling, mode, KL to N(0, I), NLL."""

from __future__ import annotations

import math

import torch


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over tensors of any shape [N, ...]; dim 0 is the batch.

    The log-variance is clamped to [logvar_min, logvar_max] so exp() stays finite
    (LDM uses [-30, 20]).
    """

    def __init__(
        self,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        logvar_min: float = -30.0,
        logvar_max: float = 20.0,
    ):
        if mean.shape != logvar.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ in shape")
        self.mean = mean
        self.logvar = torch.clamp(logvar, logvar_min, logvar_max)

    @classmethod
    def from_moments(
        cls, moments: torch.Tensor, logvar_min: float = -30.0, logvar_max: float = 20.0
    ) -> DiagonalGaussian:
        """Split `moments` [N, 2C, ...] along dim 1 into mean [N, C, ...] and logvar [N, C, ...]."""
        if moments.shape[1] % 2:
            raise ValueError(f"moments need an even channel count, got shape {tuple(moments.shape)}")
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return cls(mean, logvar, logvar_min, logvar_max)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample mean + std * eps (differentiable in mean and logvar)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over all non-batch dims -> [N] (float32).

        KL = 0.5 * sum(mean^2 + var - 1 - logvar)
        """
        mean, logvar = self.mean.float(), self.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
        return kl.flatten(1).sum(dim=1)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """-log q(x) per sample, summed over all non-batch dims -> [N] (float32)."""
        mean, logvar, x = self.mean.float(), self.logvar.float(), x.float()
        nll = 0.5 * (math.log(2.0 * math.pi) + logvar + (x - mean).pow(2) * torch.exp(-logvar))
        return nll.flatten(1).sum(dim=1)
