"""Gaussian diffusion training: forward noising q(x_t | x0), eps / v / x0 targets, min-SNR loss weighting."""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusion import schedules
from diffusion.config import DiffusionConfig

PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("none", "min_snr")
TIMESTEP_SAMPLINGS = ("uniform", "stratified")


class GaussianDiffusion:
    """Discrete-time Gaussian diffusion with `num_timesteps` steps (Ho et al. 2020), in the notation of
    diffusion/schedules.py: x_t = alpha_t * x0 + sigma_t * eps, SNR_t = alpha_t^2 / sigma_t^2."""

    def __init__(self, config: DiffusionConfig):
        if config.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {config.prediction!r} (expected one of {PREDICTIONS})")
        if config.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"unknown loss_weighting {config.loss_weighting!r} (expected one of {LOSS_WEIGHTINGS})"
            )
        if not 0.0 <= config.frame_noise_correlation < 1.0:
            raise ValueError(f"frame_noise_correlation must be in [0, 1), got {config.frame_noise_correlation}")
        if not config.temporal_loss_weight >= 0.0:
            raise ValueError(f"temporal_loss_weight must be >= 0, got {config.temporal_loss_weight}")
        if config.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"unknown timestep_sampling {config.timestep_sampling!r} (expected one of {TIMESTEP_SAMPLINGS})"
            )
        self.config = config
        self.num_timesteps = config.num_timesteps
        # float64 on CPU; gathered and moved to the data's device on demand (alpha_sigma does this)
        self.alphas_cumprod = schedules.make_alphas_cumprod(
            config.schedule,
            config.num_timesteps,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            zero_terminal_snr=config.zero_terminal_snr,
            shift=config.schedule_shift,
        )

    # ------------------------------------------------------------------ forward process
    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device=None
    ) -> torch.Tensor:
        """t ~ U{0, ..., num_timesteps - 1} [B] long, drawn on the generator's device then moved.

        With timestep_sampling "stratified" each t is still uniform over the schedule, but the batch
        holds one t from each of B equal slices of it, in a random order."""
        gen_device = generator.device if generator is not None else device
        if self.config.timestep_sampling == "stratified":
            u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
            slot = torch.arange(batch, device=gen_device, dtype=torch.float64)
            t = ((slot + u) * self.num_timesteps / batch).floor().long().clamp(max=self.num_timesteps - 1)
            t = t[torch.randperm(batch, generator=generator, device=gen_device)]
        else:
            t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    def alpha_sigma(self, t: torch.Tensor, x: torch.Tensor):
        """alpha_t, sigma_t [B, 1, ..., 1] broadcastable against x, in x's dtype."""
        return schedules.alpha_sigma(self.alphas_cumprod, t.to(x.device), x.ndim, dtype=x.dtype)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t * x0 + sigma_t * noise."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output: eps, v = alpha * eps - sigma * x0 (Salimans & Ho 2022), or x0."""
        if self.config.prediction == "eps":
            return noise
        if self.config.prediction == "x0":
            return x0
        alpha, sigma = self.alpha_sigma(t, x0)
        return schedules.v_from_x0_eps(x0, noise, alpha, sigma)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR_t [B] float64 (0 at a zero-terminal-SNR last step, inf where abar == 1)."""
        return schedules.snr(self.alphas_cumprod)[t.long().cpu()].to(t.device)

    # ------------------------------------------------------------------ loss
    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight [B] float32 of the MSE on the prediction target.

        min-SNR-gamma (Hang et al. 2023) weights the x0-space loss by min(SNR, gamma). Since
        ||eps - eps_hat||^2 = SNR * ||x0 - x0_hat||^2 and ||v - v_hat||^2 = (SNR + 1) * ||x0 - x0_hat||^2,
        the same weighting in the target's own space is
            eps: w = min(SNR, gamma) / SNR          -> 1 as SNR -> 0, -> 0 as SNR -> inf
            v:   w = min(SNR, gamma) / (SNR + 1)    -> 0 at SNR = 0,  -> 0 as SNR -> inf
            x0:  w = min(SNR, gamma)                -> 0 at SNR = 0,  -> gamma as SNR -> inf
        The limits are taken explicitly so w is finite at SNR = 0 (zero-terminal-SNR step) and SNR = inf."""
        if self.config.loss_weighting == "none":
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        gamma = self.config.min_snr_gamma
        s = self.snr(t)  # float64, may be 0 or inf
        clipped = s.clamp(max=gamma)  # min(SNR, gamma): finite everywhere, gamma at inf
        if self.config.prediction == "eps":
            # clipped / s is 1 where s <= gamma (including the 0/0 limit at s = 0), gamma / s above (0 at inf)
            w = torch.where(s > gamma, gamma / s, torch.ones_like(s))
        elif self.config.prediction == "v":
            w = torch.where(torch.isinf(s), torch.zeros_like(s), clipped / (s + 1))
        else:
            w = clipped
        return w.float()

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        *,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
        frame_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        self_condition: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Noise x0 [B, C, T, h, w] at t, run model(x_t, t, **model_kwargs), regress the target.

        `self_condition` (a model built with model.self_condition): on half the batches (one draw
        from `generator` per batch, Chen et al. 2022) a first pass without gradients estimates x0,
        and the trained pass is given it, detached, as `self_cond`; on the others it gets none
        (zeros), as at the first sampling step. Returns `self_conditioned` (0 or 1) then.

        frame_mask [B, T] (1 = frame counts; 0 for conditioning frames given to the model): the per-sample
        loss is the mean squared error over the contributing elements only (0 if a sample has none).
        With config.temporal_loss_weight w > 0 and T > 1 the loss adds w times the mean squared error of
        the frame-to-frame differences (out[:, :, 1:] - out[:, :, :-1] against the target's), over pairs
        of contributing frames. Returns loss [B] (weighted), mse [B] (unweighted, the plain error) and t [B]."""
        batch = x0.shape[0]
        if t is None:
            t = self.sample_timesteps(batch, generator, x0.device)
        gen_device = generator.device if generator is not None else x0.device
        if noise is None:
            noise = schedules.frame_correlated_noise(
                x0.shape, self.config.frame_noise_correlation, generator=generator, device=gen_device, dtype=x0.dtype
            ).to(x0.device)
        x_t = self.q_sample(x0, t, noise)
        kwargs = dict(model_kwargs or {})
        used = None
        if self_condition:
            used = bool(torch.rand((), generator=generator, device=gen_device) < 0.5)
            if used:
                with torch.no_grad():
                    alpha, sigma = self.alpha_sigma(t, x_t)
                    kwargs["self_cond"] = schedules.self_cond_estimate(
                        self.config.prediction, model(x_t, t, **kwargs), x_t, alpha.float(), sigma.float()
                    )
        out = model(x_t, t, **kwargs)
        diff = out.float() - self.target(x0, noise, t).float()  # [B, C, T, h, w]
        err = diff**2

        mask = None
        if frame_mask is not None:
            if frame_mask.shape != (batch, x0.shape[2]):
                raise ValueError(
                    f"frame_mask must be [B, T] = {(batch, x0.shape[2])}, got {tuple(frame_mask.shape)}"
                )
            mask = frame_mask.to(err)[:, None, :, None, None]  # [B, 1, T, 1, 1]
        mse = _masked_frame_mean(err, mask)
        loss = mse
        weight = self.config.temporal_loss_weight
        if weight > 0 and x0.shape[2] > 1:
            # the error of the frame-to-frame differences, over the pairs of frames that both count
            pair = None if mask is None else mask[:, :, 1:] * mask[:, :, :-1]
            loss = mse + weight * _masked_frame_mean(diff.diff(dim=2) ** 2, pair)
        result = {"loss": loss * self.loss_weight(t).to(mse.device), "mse": mse, "t": t}
        if used is not None:
            result["self_conditioned"] = torch.tensor(float(used))
        return result


def _masked_frame_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """values [B, C, T, h, w] -> [B]: the mean over the frames whose mask [B, 1, T, 1, 1] is > 0 (all
    frames when mask is None); 0 for a sample with no such frame."""
    if mask is None:
        return values.mean(dim=tuple(range(1, values.ndim)))
    per_frame = values[:, :, 0].numel() // values.shape[0]  # C * h * w elements per frame
    count = mask.sum(dim=(1, 2, 3, 4)) * per_frame
    # where(), not values * mask: a non-finite output on an excluded frame must not leak in as NaN
    masked = torch.where(mask > 0, values * mask, torch.zeros_like(values))
    return masked.sum(dim=(1, 2, 3, 4)) / count.clamp(min=1)  # 0 / 1 when no frame counts
