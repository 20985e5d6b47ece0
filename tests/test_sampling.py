"""Samplers checked against Gaussian data, whose exact denoiser and probability-flow map are known."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.sampling import (
    autoguidance,
    classifier_free_guidance,
    denoise,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    timesteps_for,
)
from diffusion.schedules import alpha_sigma, make_alphas_cumprod, v_from_x0_eps

MU, S = 0.5, 0.3  # data x0 ~ N(MU, S^2) independently per dimension
COSINE = make_alphas_cumprod("cosine", 1000)
ZERO_SNR = make_alphas_cumprod("linear", 1000, zero_terminal_snr=True)


def gaussian_model(alphas_cumprod, prediction, calls=None):
    """Exact denoiser of N(MU, S^2) data, E[x0 | x_t] = MU + alpha S^2 / (alpha^2 S^2 + sigma^2) (x_t - alpha MU),
    returned in the eps / v / x0 parameterisation."""

    def model(x, t, **cond):
        if calls is not None:
            calls.append(t.clone())
        a, s = alpha_sigma(alphas_cumprod, t, x.ndim, dtype=x.dtype)
        x0 = MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)
        eps = (x - a * x0) / s
        return {"x0": x0, "eps": eps, "v": v_from_x0_eps(x0, eps, a, s)}[prediction]

    return model


def flow_error(sampler, steps, prediction="v", alphas_cumprod=COSINE, **kw):
    """Max error of a deterministic sampler against the exact probability-flow map of Gaussian data,
    x_T = sqrt(alpha_T^2 S^2 + sigma_T^2) z + alpha_T MU  ->  x0 = MU + S z, over z in [-3, 3]."""
    z = torch.linspace(-3, 3, 13, dtype=torch.float64)[:, None]
    ab_T = float(alphas_cumprod[-1])
    x_T = math.sqrt(ab_T * S**2 + 1 - ab_T) * z + math.sqrt(ab_T) * MU
    ts = timesteps_for(steps, len(alphas_cumprod))
    x0 = sampler(gaussian_model(alphas_cumprod, prediction), x_T, ts, alphas_cumprod, prediction, **kw)
    return (x0 - (MU + S * z)).abs().max().item()


# ----------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 25, 1000])
def test_timesteps_descending_unique_in_range(spacing, steps):
    ts = timesteps_for(steps, 1000, spacing)
    assert ts.dtype == torch.long and len(ts) == steps
    assert (ts[:-1] > ts[1:]).all() and ts.min() >= 0 and ts.max() <= 999


def test_timestep_spacings_match_lin_et_al_table_2():
    assert timesteps_for(10, 1000, "trailing").tolist() == list(range(999, 0, -100))
    assert timesteps_for(10, 1000, "leading").tolist() == list(range(900, -1, -100))
    assert timesteps_for(10, 1000, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    with pytest.raises(ValueError):
        timesteps_for(10, 1000, "uniform")
    with pytest.raises(ValueError):
        timesteps_for(1001, 1000)


# ----------------------------------------------------------------------------- denoise


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_denoise_recovers_x0_for_every_parameterisation(prediction):
    x = torch.randn(64, 3, dtype=torch.float64)
    x0, eps = denoise(gaussian_model(COSINE, prediction), x, 500, COSINE, prediction)
    a, s = math.sqrt(COSINE[500]), math.sqrt(1 - COSINE[500])
    torch.testing.assert_close(x0, MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU))
    torch.testing.assert_close(a * x0 + s * eps, x)


def test_denoise_passes_float_timesteps_and_clips_consistently():
    calls = []
    x = torch.full((4, 2), 50.0, dtype=torch.float64)
    x0, eps = denoise(gaussian_model(COSINE, "v", calls), x, 10, COSINE, "v", clip_x0=1.0)
    assert calls[0].dtype.is_floating_point and calls[0].tolist() == [10.0] * 4
    assert x0.max() == 1.0
    a, s = math.sqrt(COSINE[10]), math.sqrt(1 - COSINE[10])
    torch.testing.assert_close(a * x0 + s * eps, x)


def test_eps_prediction_at_zero_snr_is_a_clear_error():
    x = torch.randn(8, 1)
    with pytest.raises(ValueError, match="SNR is 0"):
        denoise(gaussian_model(ZERO_SNR, "eps"), x, 999, ZERO_SNR, "eps")
    # leading spacing never visits the SNR-0 step, so eps-prediction samples fine there
    out = sample(
        gaussian_model(ZERO_SNR, "eps"),
        (8, 1),
        alphas_cumprod=ZERO_SNR,
        prediction="eps",
        spacing="leading",
        steps=10,
    )
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- distributions


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddpm_250_steps_matches_data_moments(prediction):
    g = torch.Generator().manual_seed(0)
    x = sample(
        gaussian_model(COSINE, prediction),
        (20000, 1),
        alphas_cumprod=COSINE,
        prediction=prediction,
        sampler="ddpm",
        steps=250,
        generator=g,
    )
    assert abs(x.mean().item() - MU) < 0.01  # standard error 0.002
    assert abs(x.std().item() - S) < 0.015  # ancestral discretisation leaves ~-0.007 at 250 steps


def test_ddim_eta_1_equals_ddpm_draw_for_draw():
    ts = timesteps_for(40, 1000)
    x_T = torch.randn(500, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model = gaussian_model(COSINE, "v")
    a = sample_ddpm(model, x_T, ts, COSINE, "v", generator=torch.Generator().manual_seed(4))
    b = sample_ddim(model, x_T, ts, COSINE, "v", eta=1.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    c = sample_ddim(model, x_T, ts, COSINE, "v", eta=0.0, generator=torch.Generator().manual_seed(4))
    assert (a - c).abs().max() > 0.05  # eta = 0 really is a different (deterministic) sampler


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddim_50_steps_follows_probability_flow(prediction):
    err50 = flow_error(sample_ddim, 50, prediction)
    assert err50 < 0.07
    assert flow_error(sample_ddim, 100, prediction) < 0.6 * err50  # first order: about halves


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_dpmpp_2m_converges_at_second_order(prediction):
    errs = [flow_error(sample_dpmpp_2m, n, prediction) for n in (10, 20, 40)]
    assert errs[1] < 0.05
    assert errs[1] < errs[0] / 3 and errs[2] < errs[1] / 3, errs  # second order: ~4x per doubling
    assert errs[0] < 0.8 * flow_error(sample_ddim, 10, prediction)


def test_dpmpp_2m_20_steps_matches_data_moments():
    x = sample(
        gaussian_model(COSINE, "v"),
        (20000, 1),
        alphas_cumprod=COSINE,
        prediction="v",
        steps=20,
        generator=torch.Generator().manual_seed(5),
    )
    assert abs(x.mean().item() - MU) < 0.01
    assert abs(x.std().item() - S) < 0.015


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("sampler, steps", [("ddpm", 250), ("ddim", 100), ("dpmpp_2m", 50)])
def test_zero_terminal_snr_starts_at_snr_0_without_nan(sampler, steps, prediction):
    calls = []
    model = gaussian_model(ZERO_SNR, prediction, calls)
    x = sample(
        model,
        (20000, 1),
        alphas_cumprod=ZERO_SNR,
        prediction=prediction,
        sampler=sampler,
        steps=steps,
        generator=torch.Generator().manual_seed(6),
    )
    assert calls[0][0].item() == 999 and ZERO_SNR[999] == 0
    assert torch.isfinite(x).all()
    assert abs(x.mean().item() - MU) < 0.01
    assert abs(x.std().item() - S) < 0.02  # ancestral: -0.013 at 250 steps on this schedule


# ----------------------------------------------------------------------------- dispatcher


def test_sample_dispatches_with_given_noise_callback_and_progress(capsys):
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(7))
    model = gaussian_model(COSINE, "v")
    seen = []
    out = sample(
        model,
        x_T.shape,
        alphas_cumprod=COSINE,
        prediction="v",
        sampler="ddim",
        steps=12,
        x_T=x_T,
        progress=True,
        callback=lambda info: seen.append(info["t"]),
    )
    torch.testing.assert_close(out, sample_ddim(model, x_T, timesteps_for(12, 1000), COSINE, "v"))
    assert seen == timesteps_for(12, 1000).tolist()
    again = sample(
        model,
        (16, 2),
        alphas_cumprod=COSINE,
        prediction="v",
        sampler="ddpm",
        steps=5,
        generator=torch.Generator().manual_seed(8),
    )
    same = sample(
        model,
        (16, 2),
        alphas_cumprod=COSINE,
        prediction="v",
        sampler="ddpm",
        steps=5,
        generator=torch.Generator().manual_seed(8),
    )
    assert torch.equal(again, same)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(model, (2, 2), alphas_cumprod=COSINE, prediction="v", sampler="euler")


# ----------------------------------------------------------------------------- classifier-free guidance


class CountingModel:
    """A class-conditional toy model: output = x * (label + 1) + cond_frames + t / 1000; counts calls."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, class_labels=None, cond_frames=None):
        self.batches.append(x.shape[0])
        assert cond_frames is None or cond_frames.shape[0] == x.shape[0]
        scale = 1.0 if class_labels is None else (class_labels.float() + 1).view(-1, 1)
        return x * scale + (0.0 if cond_frames is None else cond_frames) + t.view(-1, 1) / 1000


def test_cfg_scale_1_is_exactly_the_conditional_model():
    x, t, y, cf = torch.randn(3, 4), torch.full((3,), 7.0), torch.tensor([0, 1, 2]), torch.randn(3, 4)
    model = CountingModel()
    out = classifier_free_guidance(model, 1.0, null_label=5)(x, t, class_labels=y, cond_frames=cf)
    assert torch.equal(out, model(x, t, class_labels=y, cond_frames=cf))


def test_cfg_runs_cond_and_uncond_in_one_batched_call():
    x, t, y, cf = torch.randn(3, 4), torch.full((3,), 7.0), torch.tensor([0, 1, 2]), torch.randn(3, 4)
    model = CountingModel()
    out = classifier_free_guidance(model, 4.0, null_label=5)(x, t, class_labels=y, cond_frames=cf)
    assert model.batches == [6]
    cond = model(x, t, class_labels=y, cond_frames=cf)
    uncond = model(x, t, class_labels=torch.full_like(y, 5), cond_frames=cf)
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond))
    assert (out - cond).abs().max() > 1.0  # guidance actually moved the output


def test_cfg_interval_guides_only_inside_it_and_calls_the_model_once_outside():
    x, y, cf = torch.randn(4, 4), torch.tensor([0, 1, 2, 0]), torch.randn(4, 4)
    model = CountingModel()

    def reference(t):
        cond = model(x, t, class_labels=y, cond_frames=cf)
        uncond = model(x, t, class_labels=torch.full_like(y, 5), cond_frames=cf)
        return cond, uncond + 4.0 * (cond - uncond)

    guided = classifier_free_guidance(model, 4.0, null_label=5, interval=(300.0, 700.0))
    low = torch.full((4,), 200.0)  # below the interval: the conditional model alone, in one call of 4
    model.batches.clear()
    out = guided(x, low, class_labels=y, cond_frames=cf)
    assert model.batches == [4]
    assert torch.equal(out, reference(low)[0])
    for t in (300.0, 500.0, 700.0):  # both ends included: guided, one batched call of 8
        model.batches.clear()
        out = guided(x, torch.full((4,), t), class_labels=y, cond_frames=cf)
        assert model.batches == [8]
        torch.testing.assert_close(out, reference(torch.full((4,), t))[1])
    mixed = torch.tensor([100.0, 400.0, 800.0, 600.0])  # per sample: guided where inside, conditional elsewhere
    cond, full = reference(mixed)
    out = guided(x, mixed, class_labels=y, cond_frames=cf)
    inside = torch.tensor([False, True, False, True])
    torch.testing.assert_close(out[inside], full[inside])
    assert torch.equal(out[~inside], cond[~inside])
    assert (full[~inside] - cond[~inside]).abs().max() > 1.0  # the guided output really differs there


def test_cfg_without_labels_is_the_unconditional_model_and_plugs_into_samplers():
    model = CountingModel()
    x = torch.randn(2, 4)
    assert torch.equal(classifier_free_guidance(model, 3.0, 9)(x, torch.zeros(2)), model(x, torch.zeros(2)))
    guided = classifier_free_guidance(gaussian_model(COSINE, "v"), 1.0, 0)
    out = sample(
        guided,
        (4, 1),
        alphas_cumprod=COSINE,
        prediction="v",
        steps=3,
        cond={"class_labels": torch.zeros(4, dtype=torch.long)},
    )
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_samplers_start_from_frame_correlated_noise_when_asked(sampler):
    """x_T (and DDPM's fresh noise) follow the model's training noise: frames correlated by rho."""
    from diffusion.sampling import sample

    ab = make_alphas_cumprod("cosine", 1000, zero_terminal_snr=True)
    first = []

    def model(x, t, **_):
        if not first:
            first.append(x.clone())
        return torch.zeros_like(x)

    sample(model, (64, 4, 6, 16, 16), alphas_cumprod=ab, prediction="v", sampler=sampler, steps=3,
           generator=torch.Generator().manual_seed(0), noise_correlation=0.7, eta=1.0 if sampler == "ddim" else 0.0)  # fmt: skip
    x = first[0].double()
    corr = float(torch.corrcoef(torch.stack([x[:, :, 0].flatten(), x[:, :, 3].flatten()]))[0, 1])
    assert abs(float(x.var()) - 1) < 0.02 and abs(corr - 0.7) < 0.03


@pytest.mark.parametrize("sampler, steps", [("ddpm", 100), ("ddim", 50), ("dpmpp_2m", 25)])
def test_exact_denoiser_of_a_finite_set_reproduces_its_members(sampler, steps):
    """With the exact posterior-mean denoiser of a finite set of clips, every sample must land on
    one of them, frame for frame: catches any sampler that mixes frames, channels or batch items."""
    from diffusion.sampling import sample

    data = torch.randn(6, 4, 5, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ab = make_alphas_cumprod("cosine", 1000, zero_terminal_snr=True)

    def exact(x, t, **_):
        a, s = alpha_sigma(ab, t, 5, dtype=torch.float64)
        x = x.double()
        dist = ((x[:, None] - a[:, None] * data[None]) ** 2).flatten(2).sum(-1)  # [B, N]
        w = torch.softmax(-dist / (2 * s.flatten()[:, None] ** 2 + 1e-12), dim=1)
        x0 = torch.einsum("bn,ncthw->bcthw", w, data)
        eps = (x - a * x0) / s.clamp_min(1e-6)
        return v_from_x0_eps(x0, eps, a, s).float()

    out = sample(exact, (12, 4, 5, 4, 4), alphas_cumprod=ab, prediction="v", sampler=sampler, steps=steps,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    nearest = ((out.double()[:, None] - data[None]) ** 2).flatten(2).mean(-1).min(1).values
    assert nearest.max() < 1e-6, nearest


# ----------------------------------------------------------------------------- shifted schedule


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_shift_divides_the_snr_by_its_square(schedule):
    from diffusion.schedules import snr

    base, shifted = make_alphas_cumprod(schedule, 1000), make_alphas_cumprod(schedule, 1000, shift=2.0)
    torch.testing.assert_close(snr(shifted), snr(base) / 4.0, rtol=1e-9, atol=0.0)
    assert (shifted < base).all()  # more noise at every step
    zt = make_alphas_cumprod(schedule, 1000, shift=3.0, zero_terminal_snr=True)
    assert zt[-1] == 0.0 and torch.isclose(zt[0], make_alphas_cumprod(schedule, 1000, shift=3.0)[0])
    with pytest.raises(ValueError, match="shift"):
        make_alphas_cumprod(schedule, 1000, shift=0.0)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 250), ("dpmpp_2m", 50)])
def test_samplers_match_data_moments_on_a_shifted_schedule(sampler, steps):
    # a shift leaves more noise at the last sampled step, so few-step samplers end a little
    # shrunk toward the mean (std -0.04 at 20 DPM-Solver++ steps with shift 2); 50+ steps are fine
    ab = make_alphas_cumprod("cosine", 1000, shift=2.0, zero_terminal_snr=True)
    x = sample(gaussian_model(ab, "v"), (20000, 1), alphas_cumprod=ab, prediction="v", sampler=sampler,
               steps=steps, generator=torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - MU) < 0.01 and abs(x.std().item() - S) < 0.015


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_self_conditioned_sampling_gives_each_step_the_previous_x0_estimate(sampler):
    """Each call gets alpha x - sigma v of the call before (by hand from the recorded call), zeros
    first; under guidance both halves get the previous *guided* estimate."""
    ab = ZERO_SNR
    calls = []

    def model(x, t, class_labels=None, self_cond=None):
        out = 0.3 * x + 0.5 * self_cond + (0.0 if class_labels is None else 0.1 * class_labels.view(-1, 1, 1, 1, 1).float())
        calls.append((x.clone(), t.clone(), self_cond.clone(), out.clone(), class_labels))
        return out

    labels = torch.tensor([0, 2])
    guided = classifier_free_guidance(model, 2.0, null_label=3)
    sample(guided, (2, 4, 3, 4, 4), alphas_cumprod=ab, prediction="v", sampler=sampler, steps=6,
           cond={"class_labels": labels}, generator=torch.Generator().manual_seed(0), self_condition=True)
    assert len(calls) == 6
    assert torch.equal(calls[0][2], torch.zeros(4, 4, 3, 4, 4))
    for (x, t, _, out, lab), (_, _, given, _, _) in zip(calls, calls[1:]):
        assert torch.equal(lab, torch.tensor([0, 2, 3, 3]))  # cond and uncond halves in one call
        cond, uncond = out.chunk(2)
        v = uncond + 2.0 * (cond - uncond)  # the guided output the sampler used
        abar = float(ab[int(t[0])])
        expected = math.sqrt(abar) * x[:2] - math.sqrt(1 - abar) * v
        torch.testing.assert_close(given[:2], expected)
        torch.testing.assert_close(given[2:], expected)
    # a model that is not self-conditioned is called as before (no self_cond keyword)
    plain = []
    sample(lambda x, t: plain.append(1) or 0.3 * x, (1, 4, 2, 4, 4), alphas_cumprod=ab, prediction="v",
           sampler=sampler, steps=3, generator=torch.Generator().manual_seed(0))
    assert len(plain) == 3


# ----------------------------------------------------------------------------- autoguidance


class OffsetModel(CountingModel):
    """CountingModel plus a constant: a second network with the same inputs and different outputs;
    records the self_cond it is given."""

    def __init__(self, offset):
        super().__init__()
        self.offset, self.self_conds = offset, []

    def __call__(self, x, t, class_labels=None, cond_frames=None, self_cond=None):
        self.self_conds.append(self_cond)
        return super().__call__(x, t, class_labels, cond_frames) + self.offset


def test_autoguidance_is_guide_plus_scale_times_difference_with_the_same_inputs():
    x, t, y, cf, sc = torch.randn(3, 4), torch.full((3,), 7.0), torch.tensor([0, 1, 2]), torch.randn(3, 4), torch.randn(3, 4)
    model, guide = OffsetModel(0.25), OffsetModel(-1.0)
    out = autoguidance(model, guide, 2.5)(x, t, class_labels=y, cond_frames=cf, self_cond=sc)
    good = model(x, t, class_labels=y, cond_frames=cf, self_cond=sc)
    weak = guide(x, t, class_labels=y, cond_frames=cf, self_cond=sc)
    torch.testing.assert_close(out, weak + 2.5 * (good - weak))
    assert (out - good).abs().min() > 1.0  # the guide moved every output
    assert all(s is sc for s in model.self_conds + guide.self_conds)  # both saw the same estimate
    model, guide = OffsetModel(0.25), OffsetModel(-1.0)
    assert torch.equal(autoguidance(model, guide, 1.0)(x, t, class_labels=y), model(x, t, class_labels=y))
    assert guide.batches == []  # scale 1: the guide is never called


def test_autoguidance_inside_cfg_autoguides_both_halves():
    x, t, y = torch.randn(3, 4), torch.full((3,), 7.0), torch.tensor([0, 1, 2])
    model, guide = OffsetModel(0.25), OffsetModel(-1.0)
    out = classifier_free_guidance(autoguidance(model, guide, 2.0), 3.0, null_label=5)(x, t, class_labels=y)
    assert model.batches == [6] and guide.batches == [6]  # one batched call each

    def ag(labels):
        g, w = guide(x, t, class_labels=labels), model(x, t, class_labels=labels)
        return g + 2.0 * (w - g)

    cond, uncond = ag(y), ag(torch.full_like(y, 5))
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond))


def test_autoguidance_with_a_blurrier_guide_sharpens_samples_towards_the_data():
    """Data N(MU, S^2). The model is the exact denoiser of a blurrier N(MU, 0.45^2) (an undertrained
    model spreads between modes), the guide that of a blurrier still N(MU, 0.7^2). Guided samples
    (probability flow, DDIM-100) are narrower than the model's own, keep the mean, and stay wider
    than zero; a flipped sign (or guiding towards the guide) would widen them."""

    def denoiser(std):
        def model(x, t, **cond):
            a, s = alpha_sigma(COSINE, t, x.ndim, dtype=x.dtype)
            x0 = MU + a * std**2 / (a**2 * std**2 + s**2) * (x - a * MU)
            return v_from_x0_eps(x0, (x - a * x0) / s, a, s)

        return model

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4000, 1, generator=g, dtype=torch.float64)
    ts = timesteps_for(100, 1000)
    plain = sample_ddim(denoiser(0.45), x_T, ts, COSINE, "v")
    guided = sample_ddim(autoguidance(denoiser(0.45), denoiser(0.7), 2.0), x_T, ts, COSINE, "v")
    assert abs(plain.std().item() - 0.45) < 0.02  # the sampler reproduces the model's own spread
    assert 0.1 < guided.std().item() < 0.38 and abs(guided.mean().item() - MU) < 0.02
