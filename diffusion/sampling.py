"""Samplers (DDPM, DDIM, DPM-Solver++(2M)) and classifier-free guidance for any `model(x, t, **cond)`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from diffusion.schedules import frame_correlated_noise, self_cond_estimate, to_x0_eps

# Conventions (k-diffusion style): a sampler takes a model callable returning its raw output
# (eps, v or x0 as `prediction` says), the float64 table abar_t for t = 0..N-1, and a descending
# list of discrete timesteps. Each step goes from t to the next listed timestep s; after the last
# one comes s = -1, which stands for the clean data (abar = 1, alpha = 1, sigma = 0).
# Schedule coefficients are Python floats computed in double precision.

Model = Callable[..., torch.Tensor]
Callback = Callable[[dict], None]


def timesteps_for(num_steps: int, num_timesteps: int, spacing: str = "trailing") -> torch.Tensor:
    """`num_steps` descending training timesteps out of `num_timesteps` (Lin et al. 2023, Table 2).

    "trailing" starts at t = N-1 (needed to reach SNR 0 with a zero-terminal-SNR schedule),
    "leading" is DDIM's arange(0, N, N // S) and "linspace" rounds linspace(0, N-1, S)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if spacing == "trailing":
        steps = torch.arange(num_steps, dtype=torch.float64)
        ts = (num_timesteps - steps * num_timesteps / num_steps).round() - 1
    elif spacing == "leading":
        ts = (torch.arange(num_steps, dtype=torch.float64) * (num_timesteps // num_steps)).flip(0)
    elif spacing == "linspace":
        ts = torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64).round().flip(0)
    else:
        raise ValueError(
            f"unknown timestep spacing {spacing!r} (expected 'trailing', 'leading' or 'linspace')"
        )
    return ts.long()


def _alpha_sigma(alphas_cumprod: torch.Tensor, t: int) -> tuple[float, float]:
    """(alpha_t, sigma_t) as floats; t = -1 is the clean data (1, 0)."""
    abar = 1.0 if t < 0 else float(alphas_cumprod[t])
    return math.sqrt(abar), math.sqrt(max(1.0 - abar, 0.0))


def _pairs(timesteps) -> list[tuple[int, int]]:
    """Consecutive (t, s) pairs of a descending timestep list, ending with (t_last, -1)."""
    ts = [int(t) for t in timesteps]
    return list(zip(ts, ts[1:] + [-1]))


def _randn(shape, generator: torch.Generator | None, device, dtype=torch.float32, correlation: float = 0.0) -> torch.Tensor:
    """Noise drawn on the generator's own device (a CPU generator also seeds CUDA runs), then moved:
    N(0, I), or for videos [B, C, T, h, w] with `correlation` > 0 the mixed-noise prior of
    `schedules.frame_correlated_noise` (unit variance, correlation between frames)."""
    gen_device = generator.device if generator is not None else device
    noise = frame_correlated_noise(tuple(shape), correlation, generator=generator, device=gen_device, dtype=dtype)
    return noise.to(device)


def _noise(x: torch.Tensor, generator: torch.Generator | None, correlation: float = 0.0) -> torch.Tensor:
    return _randn(x.shape, generator, x.device, x.dtype, correlation)


def denoise(
    model: Model,
    x: torch.Tensor,
    t_index: int,
    alphas_cumprod: torch.Tensor,
    prediction: str,
    cond: dict | None = None,
    clip_x0: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model at discrete timestep `t_index` and return (x0_hat, eps_hat).

    The model gets t as a float [B] tensor. With `clip_x0`, x0_hat is clamped to [-clip_x0, clip_x0]
    and eps_hat recomputed from it so the two stay consistent with x."""
    alpha, sigma = _alpha_sigma(alphas_cumprod, t_index)
    if prediction == "eps" and alpha == 0.0:
        raise ValueError(
            f"eps-prediction cannot denoise at t={t_index}: SNR is 0 there (zero-terminal-SNR schedule). "
            "Use a v- or x0-prediction model, or 'leading' timestep spacing."
        )
    t = torch.full((x.shape[0],), float(t_index), device=x.device)
    out = model(x, t, **(cond or {}))
    x0, eps = to_x0_eps(prediction, out, x, alpha, sigma)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x - alpha * x0) / sigma  # sigma > 0 at every training timestep
    return x0, eps


def sample_ddpm(
    model: Model,
    x_T: torch.Tensor,
    timesteps: Sequence[int] | torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: str,
    *,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    clip_x0: float | None = None,
    noise_correlation: float = 0.0,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2) from the posterior q(x_s | x_t, x0_hat) between
    consecutive chosen timesteps t > s (strided, as in Nichol & Dhariwal 2021):
        mean = sqrt(abar_s) b / (1 - abar_t) x0 + sqrt(abar_t / abar_s) (1 - abar_s) / (1 - abar_t) x_t
        var  = b (1 - abar_s) / (1 - abar_t),   b = 1 - abar_t / abar_s."""
    x = x_T
    for i, (t, s) in enumerate(_pairs(timesteps)):
        x0, _ = denoise(model, x, t, alphas_cumprod, prediction, cond, clip_x0)
        ab_t = float(alphas_cumprod[t])
        ab_s = 1.0 if s < 0 else float(alphas_cumprod[s])
        beta = 1.0 - ab_t / ab_s
        coef_x0 = math.sqrt(ab_s) * beta / (1.0 - ab_t)
        coef_xt = math.sqrt(ab_t / ab_s) * (1.0 - ab_s) / (1.0 - ab_t)
        x = coef_x0 * x0 + coef_xt * x
        if s >= 0:  # no noise on the step to the data (variance 0)
            x = x + math.sqrt(beta * (1.0 - ab_s) / (1.0 - ab_t)) * _noise(x, generator, noise_correlation)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


def sample_ddim(
    model: Model,
    x_T: torch.Tensor,
    timesteps: Sequence[int] | torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: str,
    *,
    eta: float = 0.0,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    clip_x0: float | None = None,
    noise_correlation: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z with
    c = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s). eta = 0 is deterministic;
    eta = 1 has the DDPM posterior variance (and then equals `sample_ddpm` draw for draw)."""
    x = x_T
    for i, (t, s) in enumerate(_pairs(timesteps)):
        x0, eps = denoise(model, x, t, alphas_cumprod, prediction, cond, clip_x0)
        ab_t = float(alphas_cumprod[t])
        ab_s = 1.0 if s < 0 else float(alphas_cumprod[s])
        c = eta * math.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(1.0 - ab_s - c * c, 0.0)) * eps
        if s >= 0 and c > 0:
            x = x + c * _noise(x, generator, noise_correlation)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


def _log(v: float) -> float:
    return math.log(v) if v > 0 else -math.inf


def sample_dpmpp_2m(
    model: Model,
    x_T: torch.Tensor,
    timesteps: Sequence[int] | torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: str,
    *,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    clip_x0: float | None = None,
    noise_correlation: float = 0.0,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data-prediction form with lambda = log(alpha / sigma):
        x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) D,   h = lambda_s - lambda_t,
        D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev,   r = h_prev / h.
    Steps with an infinite h or h_prev fall back to first order (D = x0_t): the first step, the
    step after SNR 0 (lambda = -inf) and the last step to the data (sigma = 0, lambda = +inf),
    where the update reduces to x = x0_t. `generator` and `noise_correlation` are unused
    (deterministic sampler: only x_T is random)."""
    x = x_T
    x0_prev, h_prev = None, math.inf
    for i, (t, s) in enumerate(_pairs(timesteps)):
        x0, _ = denoise(model, x, t, alphas_cumprod, prediction, cond, clip_x0)
        alpha_t, sigma_t = _alpha_sigma(alphas_cumprod, t)
        alpha_s, sigma_s = _alpha_sigma(alphas_cumprod, s)
        h = (_log(alpha_s) - _log(sigma_s)) - (_log(alpha_t) - _log(sigma_t))
        d = x0
        if x0_prev is not None and math.isfinite(h) and math.isfinite(h_prev):
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


def self_conditioned(model: Model, alphas_cumprod: torch.Tensor, prediction: str) -> Model:
    """A self-conditioned model (model.self_condition) as a plain `model(x, t, **cond)` for the
    samplers: each call gives the model, as `self_cond`, its x0 estimate from the previous call
    (zeros at the first), as Chen et al. 2022 sample. Wrap the outermost model (after guidance), so
    that both halves of a guided call get the previous *guided* estimate. One wrapper per sampling
    run: it keeps that estimate between calls."""
    previous: list[torch.Tensor] = []  # the last call's estimate

    def net(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        out = model(x, t, self_cond=previous[0] if previous else torch.zeros_like(x), **cond)
        alpha, sigma = _alpha_sigma(alphas_cumprod, int(t.reshape(-1)[0]))
        previous[:] = [self_cond_estimate(prediction, out, x, alpha, sigma)]
        return out

    return net


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}


@torch.no_grad()
def sample(
    model: Model,
    shape: Sequence[int],
    *,
    alphas_cumprod: torch.Tensor,
    prediction: str,
    sampler: str = "dpmpp_2m",
    steps: int = 25,
    eta: float = 0.0,
    spacing: str = "trailing",
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    x_T: torch.Tensor | None = None,
    callback: Callback | None = None,
    clip_x0: float | None = None,
    noise_correlation: float = 0.0,
    self_condition: bool = False,
) -> torch.Tensor:
    """Draw x0 samples of `shape` from N(0, I) noise (or the given `x_T`) with the named sampler.
    `noise_correlation`: the model was trained with frame-correlated noise (mixed-noise prior), so
    x_T and any fresh noise are drawn the same way. `self_condition`: the model is self-conditioned
    (model.self_condition); each step gives it the previous step's x0 estimate (`self_conditioned`)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (expected one of {sorted(SAMPLERS)})")
    if self_condition:
        model = self_conditioned(model, alphas_cumprod, prediction)
    timesteps = timesteps_for(steps, len(alphas_cumprod), spacing)
    if x_T is None:
        x_T = _randn(shape, generator, device, correlation=noise_correlation)
    extra = {"eta": eta} if sampler == "ddim" else {}
    with tqdm(total=len(timesteps), disable=not progress, desc=sampler) as bar:

        def step_done(info: dict) -> None:
            bar.update(1)
            if callback is not None:
                callback(info)

        return SAMPLERS[sampler](
            model,
            x_T,
            timesteps,
            alphas_cumprod,
            prediction,
            cond=cond,
            generator=generator,
            callback=step_done,
            clip_x0=clip_x0,
            noise_correlation=noise_correlation,
            **extra,
        )


def classifier_free_guidance(model: Model, scale: float, null_label: int | None = None,
                             negative_text: tuple[torch.Tensor, torch.Tensor] | None = None,
                             interval: tuple[float, float] | None = None) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022) on the raw output: uncond + scale (cond - uncond).

    The conditional and the unconditional halves run in one batched call. The unconditional half
    has every condition the model was given dropped together: class_labels -> `null_label`, and
    text -> the null text (text_mask all False), or the `negative_text` (tokens [1, L, D], mask
    [1, L]) when a negative prompt is given. Other tensor kwargs with a batch dimension (cond_frames,
    cond_mask) are duplicated for both. scale == 1, or no class label and no text, calls the
    conditional model alone, so it is exactly that model.

    `interval` (lo, hi), in the model's timesteps: guidance only at the steps with lo <= t <= hi,
    the conditional model alone (one call) at the others (guidance in a limited interval,
    Kynkaanniemi et al. 2024). None: at every step."""

    def guided(x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
               text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None, **cond):
        given = {k: v for k, v in (("class_labels", class_labels), ("text", text), ("text_mask", text_mask)) if v is not None}
        inside = None if interval is None else (t >= interval[0]) & (t <= interval[1])
        if scale == 1 or (class_labels is None and text is None) or (inside is not None and not inside.any()):
            return model(x, t, **given, **cond)
        batch = x.shape[0]

        def twice(v):
            return torch.cat([v, v]) if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == batch else v

        both = {k: twice(v) for k, v in cond.items()}
        if class_labels is not None:
            if null_label is None:
                raise ValueError("class-conditional guidance needs the null label")
            both["class_labels"] = torch.cat([class_labels, torch.full_like(class_labels, null_label)])
        if text is not None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if text_mask is None else text_mask.bool()
            if negative_text is None:
                un_text, un_mask = torch.zeros_like(text), torch.zeros_like(mask)
            else:
                un_text = negative_text[0].to(text).expand(batch, -1, -1)
                un_mask = negative_text[1].to(mask.device).bool().expand(batch, -1)
                if un_text.shape != text.shape:
                    raise ValueError(f"negative prompt tokens {tuple(un_text.shape)} do not match {tuple(text.shape)}")
            both["text"], both["text_mask"] = torch.cat([text, un_text]), torch.cat([mask, un_mask])
        out_cond, out_uncond = model(twice(x), twice(t), **both).chunk(2)
        out = out_uncond + scale * (out_cond - out_uncond)
        if inside is not None and not inside.all():  # samples outside the interval: the conditional output
            out = torch.where(inside.view(-1, *[1] * (out.ndim - 1)), out, out_cond)
        return out

    return guided


def autoguidance(model: Model, guide: Model, scale: float) -> Model:
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):
    guide + scale (model - guide) on the raw output, where `guide` is a weaker model of the same
    task and conditions (here: an earlier checkpoint of the same run). Where the guide errs more
    than the model (in-between modes it has not yet separated), the difference pushes the sample
    away from its error, towards the modes the better model found; unlike classifier-free guidance
    it needs no condition and does not trade variety for it. Both get the same inputs (class
    labels, text, frame conditions, self-conditioning estimate). scale == 1 is the model alone (one
    call). Composes with `classifier_free_guidance` (wrap this one first): each half of a CFG call
    is then autoguided."""
    if scale == 1:
        return model

    def guided(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        out = model(x, t, **cond)
        weak = guide(x, t, **cond)
        return weak + scale * (out - weak)

    return guided
