"""Noise schedules as pure functions of the step count, and the conversions between
eps / v / x0 parameterisations. All tensors are float64 on CPU unless given otherwise.

Notation (Ho et al. 2020; Salimans & Ho 2022): x_t = alpha_t * x0 + sigma_t * eps with
alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t); SNR(t) = alpha_t^2 / sigma_t^2;
v = alpha_t * eps - sigma_t * x0.
"""

from __future__ import annotations

import math

import torch


def linear_alphas_cumprod(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear beta schedule (Ho et al. 2020), scaled for 1000 steps."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021): abar(t) = cos^2((t/T + s)/(1 + s) * pi/2).
    Betas are clipped at `max_beta` to avoid the singularity at t = T."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Alg. 1: shift and scale sqrt(abar) so the last step has SNR exactly 0
    while the first keeps its value. The model must then predict v (eps is undefined at SNR 0)."""
    sqrt_ab = alphas_cumprod.sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return sqrt_ab**2


def make_alphas_cumprod(
    schedule: str,
    num_timesteps: int,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    zero_terminal_snr: bool = False,
    shift: float = 1.0,
) -> torch.Tensor:
    """abar_t for t = 0..num_timesteps-1 (float64).

    `shift` > 1 moves every step toward more noise: SNR(t) -> SNR(t) / shift^2 (the resolution
    shift of Hoogeboom et al. 2023, "simple diffusion", and of SD3's timestep shift). Applied before
    the zero-terminal-SNR rescaling."""
    if not shift > 0:
        raise ValueError(f"schedule shift must be > 0, got {shift}")
    if schedule == "linear":
        ab = linear_alphas_cumprod(num_timesteps, beta_start, beta_end)
    elif schedule == "cosine":
        ab = cosine_alphas_cumprod(num_timesteps)
    else:
        raise ValueError(f"unknown noise schedule {schedule!r} (expected 'linear' or 'cosine')")
    if shift != 1.0:
        ab = ab / (ab + (1.0 - ab) * shift**2)  # SNR / shift^2
    return rescale_zero_terminal_snr(ab) if zero_terminal_snr else ab


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR = abar / (1 - abar); inf where abar == 1, 0 where abar == 0."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int, dtype=torch.float32):
    """alpha_t, sigma_t gathered at integer timesteps `t` [B], shaped [B, 1, ...] for broadcasting."""
    ab = alphas_cumprod.to(t.device)[t.long()]
    shape = (-1,) + (1,) * (ndim - 1)
    return ab.sqrt().to(dtype).view(shape), (1 - ab).sqrt().to(dtype).view(shape)


# ----------------------------------------------------------------------------- conversions
# alpha, sigma broadcast against x; alpha^2 + sigma^2 = 1.


def x0_from_eps(x_t, eps, alpha, sigma):
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t, x0, alpha, sigma):
    return (x_t - alpha * x0) / sigma


def x0_from_v(x_t, v, alpha, sigma):
    return alpha * x_t - sigma * v


def eps_from_v(x_t, v, alpha, sigma):
    return sigma * x_t + alpha * v


def v_from_x0_eps(x0, eps, alpha, sigma):
    return alpha * eps - sigma * x0


def to_x0_eps(prediction: str, model_out, x_t, alpha, sigma):
    """Turn a raw model output of the given parameterisation into (x0_hat, eps_hat).
    For eps-prediction at sigma ~ 1 the x0 estimate is ill-conditioned; use v there."""
    if prediction == "eps":
        eps = model_out
        return x0_from_eps(x_t, eps, alpha, sigma), eps
    if prediction == "v":
        return x0_from_v(x_t, model_out, alpha, sigma), eps_from_v(x_t, model_out, alpha, sigma)
    if prediction == "x0":
        x0 = model_out
        return x0, eps_from_x0(x_t, x0, alpha, sigma)
    raise ValueError(f"unknown prediction type {prediction!r} (expected 'eps', 'v' or 'x0')")


def self_cond_estimate(prediction: str, model_out, x_t, alpha, sigma):
    """The x0 estimate a self-conditioned model is given next (training's second pass, the sampler's
    next step): `to_x0_eps`'s x0 in float32, with zeros where it is not finite (eps-prediction at
    SNR 0, alpha = 0, has none), returned in x_t's dtype."""
    x0 = to_x0_eps(prediction, model_out.float(), x_t.float(), alpha, sigma)[0]
    return torch.where(torch.isfinite(x0), x0, torch.zeros_like(x0)).to(x_t.dtype)


def frame_correlated_noise(shape, correlation: float = 0.0, *, generator=None, device=None, dtype=torch.float32):
    """Gaussian noise whose frames share a component (the "mixed noise" prior of Ge et al. 2023,
    PYoCo): for a video shape [B, C, T, h, w], eps = sqrt(rho) * shared + sqrt(1 - rho) * own, with
    `shared` one draw [B, C, 1, h, w] for all frames. Every element stays N(0, 1); two frames of a
    clip correlate by rho. A model trained on this noise starts every frame from nearly the same
    noise at sampling time, which makes temporal coherence far easier to learn. rho = 0 (or T = 1,
    images) is plain N(0, I), drawn exactly as torch.randn would draw it."""
    if not 0.0 <= correlation < 1.0:
        raise ValueError(f"frame noise correlation must be in [0, 1), got {correlation}")
    own = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if correlation == 0.0 or len(shape) != 5 or shape[2] == 1:
        return own
    shared = torch.randn((*shape[:2], 1, *shape[3:]), generator=generator, device=device, dtype=dtype)
    return math.sqrt(correlation) * shared + math.sqrt(1.0 - correlation) * own
