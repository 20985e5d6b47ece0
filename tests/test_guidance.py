"""Known-frame conditioning: kwargs for frame-conditioned models, reconstruction guidance, sliding-window extension."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.guidance import (
    extend_video,
    frame_conditioning_kwargs,
    raw_from_x0,
    reconstruction_guided,
    replace_known,
)
from diffusion.sampling import sample
from diffusion.schedules import alpha_sigma, make_alphas_cumprod, to_x0_eps, v_from_x0_eps

COSINE = make_alphas_cumprod("cosine", 1000)
T, DELTA = 4, 0.1
# Videos [B, 1, T, 1, 1] whose frames share one N(0, 1) value plus N(0, DELTA^2) per-frame noise.
COV = torch.ones(T, T, dtype=torch.float64) + DELTA**2 * torch.eye(T, dtype=torch.float64)


def joint_matrix(alphas_cumprod, t):
    """M_t [B, T, T] with E[x0 | x_t] = M_t x_t = alpha Cov (alpha^2 Cov + sigma^2 I)^-1 x_t."""
    a, s = alpha_sigma(alphas_cumprod, t, 3, dtype=torch.float64)
    return a * COV @ torch.linalg.inv(a**2 * COV + s**2 * torch.eye(T, dtype=torch.float64))


def joint_model(alphas_cumprod, prediction):
    """Exact unconditional denoiser of the correlated videos (it couples the frames)."""

    def model(x, t, **cond):
        m = joint_matrix(alphas_cumprod, t).to(x.dtype)
        x0 = torch.einsum("bij,bj->bi", m, x.flatten(1)).view_as(x)
        a, s = alpha_sigma(alphas_cumprod, t, x.ndim, dtype=x.dtype)
        eps = (x - a * x0) / s
        return {"x0": x0, "eps": eps, "v": v_from_x0_eps(x0, eps, a, s)}[prediction]

    return model


def first_frame_known(batch, seed=0):
    """Frame 0 drawn from its marginal N(0, 1 + DELTA^2); the rest unknown."""
    x_a = torch.randn(batch, generator=torch.Generator().manual_seed(seed)) * math.sqrt(1 + DELTA**2)
    known = torch.zeros(batch, 1, T, 1, 1)
    mask = torch.zeros(batch, 1, T, 1, 1)
    known[:, 0, 0, 0, 0], mask[:, :, 0] = x_a, 1.0
    return known, mask, x_a


# ----------------------------------------------------------------------------- frame conditioning


def test_frame_conditioning_kwargs_places_known_frames_and_mask():
    known = torch.randn(2, 3, 2, 4, 5)
    kw = frame_conditioning_kwargs(known, 6, positions=[1, 4])
    assert kw["cond_frames"].shape == (2, 3, 6, 4, 5) and kw["cond_mask"].shape == (2, 1, 6, 1, 1)
    assert torch.equal(kw["cond_frames"][:, :, [1, 4]], known)
    assert kw["cond_frames"][:, :, [0, 2, 3, 5]].abs().sum() == 0
    assert kw["cond_mask"].flatten(1).tolist() == [[0, 1, 0, 0, 1, 0]] * 2
    default = frame_conditioning_kwargs(known, 3)
    assert default["cond_mask"].flatten(1).tolist() == [[1, 1, 0]] * 2
    with pytest.raises(ValueError):
        frame_conditioning_kwargs(known, 4, positions=[1, 4])


def test_replace_known_takes_known_frames_exactly():
    x, known = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    mask = torch.tensor([1.0, 0, 0, 1]).view(1, 1, 4, 1, 1).expand(2, 1, 4, 1, 1)
    out = replace_known(x, known, mask)
    assert torch.equal(out[:, :, [0, 3]], known[:, :, [0, 3]]) and torch.equal(
        out[:, :, [1, 2]], x[:, :, [1, 2]]
    )


# ----------------------------------------------------------------------------- reconstruction guidance


# eps at t = 999 is left out: eps-prediction is undefined at SNR 0
@pytest.mark.parametrize(
    "prediction, t", [("eps", 0), ("eps", 500), ("v", 0), ("v", 999), ("x0", 0), ("x0", 999)]
)
def test_raw_from_x0_inverts_to_x0_eps(prediction, t):
    ab = make_alphas_cumprod("linear", 1000, zero_terminal_snr=True)
    a, s = alpha_sigma(ab, torch.tensor([t]), 2, dtype=torch.float64)
    x_t, x0 = torch.randn(1, 16, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64)
    raw = raw_from_x0(prediction, x0, x_t, a, s)
    torch.testing.assert_close(to_x0_eps(prediction, raw, x_t, a, s)[0], x0)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_reconstruction_guidance_implements_eq_7(prediction):
    """x_tilde^b = x_hat^b - (w alpha / 2) grad_b ||x^a - x_hat^a||^2 with the analytic gradient of a
    linear denoiser x_hat = M x_t: grad = -2 M_a^T (x^a - M_a x_t); known frames replaced by x^a."""
    known, mask, x_a = first_frame_known(3)
    x_t = torch.randn(3, 1, T, 1, 1, dtype=torch.float64)
    t = torch.full((3,), 300.0)
    w = 2.5
    guided = reconstruction_guided(joint_model(COSINE, prediction), known, mask, COSINE, prediction, w)
    a, s = alpha_sigma(COSINE, t, 5, dtype=torch.float64)
    x0 = to_x0_eps(prediction, guided(x_t, t), x_t, a, s)[0].flatten(1)  # [B, T]

    m = joint_matrix(COSINE, t)  # [B, T, T]
    x_hat = torch.einsum("bij,bj->bi", m, x_t.flatten(1))
    grad = -2 * m[:, 0, :] * (x_a.double() - x_hat[:, 0])[:, None]  # d/dx_t of (x^a - M_0 x_t)^2
    expected_b = x_hat[:, 1:] - (w * a.flatten(1) / 2) * grad[:, 1:]
    torch.testing.assert_close(x0[:, 1:], expected_b)
    torch.testing.assert_close(x0[:, 0], x_a.double())
    assert (expected_b - x_hat[:, 1:]).abs().max() > 0.01  # the guidance term is not negligible here

    # without replacement the known frames keep the model's own estimate (no gradient step there)
    guided = reconstruction_guided(
        joint_model(COSINE, prediction), known, mask, COSINE, prediction, w, replace=False
    )
    x0 = to_x0_eps(prediction, guided(x_t, t), x_t, a, s)[0].flatten(1)
    torch.testing.assert_close(x0, torch.cat([x_hat[:, :1], expected_b], dim=1))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_reconstruction_guidance_weight_0_without_replacement_is_the_model(prediction):
    known, mask, _ = first_frame_known(2)
    model = joint_model(COSINE, prediction)
    x_t, t = torch.randn(2, 1, T, 1, 1), torch.full((2,), 700.0)
    guided = reconstruction_guided(model, known, mask, COSINE, prediction, 0.0, replace=False)
    torch.testing.assert_close(guided(x_t, t), model(x_t, t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_reconstruction_guidance_samples_the_conditional_distribution(prediction):
    """Given frame 0, the other frames should follow x^b | x^a ~ N(x^a / (1 + d^2), 1 + d^2 - 1 / (1 + d^2)).
    Replacement alone leaves x^b nearly independent of x^a; guidance (w_r = 5) brings the spread around
    the conditional mean down to the conditional variance."""
    known, mask, x_a = first_frame_known(1000)
    cond_mean = (x_a / (1 + DELTA**2))[:, None]
    cond_var = 1 + DELTA**2 - 1 / (1 + DELTA**2)  # 0.0199
    model = joint_model(COSINE, prediction)

    def spread(weight):
        guided = reconstruction_guided(model, known, mask, COSINE, prediction, weight)
        x = sample(
            guided,
            known.shape,
            alphas_cumprod=COSINE,
            prediction=prediction,
            sampler="ddim",
            steps=25,
            generator=torch.Generator().manual_seed(1),
        )
        torch.testing.assert_close(x[:, :, 0], known[:, :, 0], rtol=0, atol=1e-5)  # known frame kept
        return (x[:, 0, 1:, 0, 0] - cond_mean).square().mean().item()

    replaced, guided = spread(0.0), spread(5.0)
    assert replaced > 10 * cond_var
    assert 0.25 * cond_var < guided < 2 * cond_var, (guided, cond_var)


# ----------------------------------------------------------------------------- extension


def recording_sample_fn(calls, window):
    """Dummy window sampler: keeps the known frames, fills the rest with a call counter; records inputs."""

    def sample_fn(known, mask):
        assert known.shape[2] == window and mask.shape == (known.shape[0], 1, window, 1, 1)
        calls.append((known.clone(), mask.clone()))
        return replace_known(torch.full_like(known, 100.0 + len(calls)), known, mask)

    return sample_fn


def test_extend_video_keeps_given_frames_and_conditions_on_the_overlap():
    calls = []
    given = torch.randn(2, 3, 2, 4, 4)
    out = extend_video(recording_sample_fn(calls, window=5), given, total_frames=11, window=5, overlap=3)
    assert out.shape == (2, 3, 11, 4, 4)
    assert torch.equal(out[:, :, :2], given)
    # first window: the 2 given frames; later windows: the last 3 frames produced so far
    assert calls[0][1].flatten(1)[0].tolist() == [1, 1, 0, 0, 0]
    assert torch.equal(calls[0][0][:, :, :2], given)
    frame_ids = out[0, 0, :, 0, 0].tolist()
    assert frame_ids[2:] == [101, 101, 101, 102, 102, 103, 103, 104, 104]
    for k, (known, mask) in enumerate(calls[1:]):
        start = 5 + 2 * k  # frames produced before this window
        assert mask.flatten(1)[0].tolist() == [1, 1, 1, 0, 0]
        assert torch.equal(known[:, :, :3], out[:, :, start - 3 : start])
    assert len(calls) == 4


def test_extend_video_from_nothing_and_errors():
    calls = []
    out = extend_video(recording_sample_fn(calls, 4), torch.zeros(1, 2, 0, 3, 3), 6, window=4, overlap=1)
    assert out.shape == (1, 2, 6, 3, 3) and calls[0][1].sum() == 0
    assert out[0, 0, :, 0, 0].tolist() == [101, 101, 101, 101, 102, 102]
    with pytest.raises(ValueError):
        extend_video(recording_sample_fn([], 4), torch.zeros(1, 2, 1, 3, 3), 6, window=4, overlap=4)
    with pytest.raises(ValueError):
        extend_video(recording_sample_fn([], 4), torch.zeros(1, 2, 7, 3, 3), 6, window=4, overlap=1)


def test_first_window_is_given_every_known_frame_that_fits():
    """K = 6 known frames, window 8, overlap 4: the first window is conditioned on all 6 (not only
    the last `overlap`), and with K >= window on the last window - 1 of them."""
    calls = []
    given = torch.randn(1, 2, 6, 3, 3)
    out = extend_video(recording_sample_fn(calls, 8), given, total_frames=12, window=8, overlap=4)
    assert calls[0][1].flatten().tolist() == [1] * 6 + [0, 0]
    assert torch.equal(calls[0][0][:, :, :6], given) and torch.equal(out[:, :, :6], given)
    assert out.shape[2] == 12 and calls[1][1].flatten().tolist() == [1] * 4 + [0] * 4
    calls = []
    given = torch.randn(1, 2, 10, 3, 3)
    out = extend_video(recording_sample_fn(calls, 8), given, total_frames=12, window=8, overlap=4)
    assert calls[0][1].flatten().tolist() == [1] * 7 + [0] and torch.equal(calls[0][0][:, :, :7], given[:, :, 3:])
    assert torch.equal(out[:, :, :10], given) and out.shape[2] == 12


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_reconstruction_guidance_lowers_the_error_on_the_known_frames(prediction):
    """Without replacing the known frame, the sampled frame 0 of an unguided run is independent of
    x^a; guidance on the other frames pulls the whole sample, frame 0 included, towards x^a."""
    known, mask, x_a = first_frame_known(500, seed=3)
    model = joint_model(COSINE, prediction)

    def known_frame_error(weight):
        guided = reconstruction_guided(model, known, mask, COSINE, prediction, weight, replace=False)
        x = sample(guided, known.shape, alphas_cumprod=COSINE, prediction=prediction, sampler="ddim", steps=25,
                   generator=torch.Generator().manual_seed(1))  # fmt: skip
        return (x[:, 0, 0, 0, 0] - x_a).square().mean().item()

    unguided, guided = known_frame_error(0.0), known_frame_error(5.0)
    assert unguided > 1.5  # independent draws: E(x - y)^2 = 2 (1 + d^2)
    assert guided < 0.25 * unguided, (guided, unguided)


@pytest.mark.parametrize("n, factor, window, overlap", [(5, 2, 8, 4), (3, 4, 8, 2), (7, 3, 8, 0), (2, 2, 8, 4), (4, 1, 8, 4)])
def test_interpolation_places_known_frames_exactly_and_fills_every_other_frame(n, factor, window, overlap):
    from diffusion.guidance import interpolate_video

    known = torch.randn(2, 3, n, 2, 2)
    calls = []

    def sample_fn(context, mask):
        calls.append((context.clone(), mask.clone()))
        assert mask.shape == (2, 1, context.shape[2], 1, 1) and 0 < mask.sum() / 2 < context.shape[2]
        return torch.full_like(context, float(len(calls)))  # window number, to see who wrote what

    out = interpolate_video(sample_fn, known, factor, window, overlap)
    assert out.shape == (2, 3, n * factor, 2, 2)  # exact count, odd lengths included
    assert torch.equal(out[:, :, ::factor], known)  # kept bit for bit, at every factor-th position
    filled = torch.ones(n * factor, dtype=torch.bool)
    filled[::factor] = False
    assert (out[:, :, filled] >= 1).all() and (len(calls) == 0) == (factor == 1)
    for context, mask in calls:  # a window is given the frames fixed before it, and nothing else
        given = mask[0, 0, :, 0, 0].bool()
        assert (context[:, :, ~given] == 0).all() and (context[:, :, given] != 0).all()
    if overlap and len(calls) > 1:  # later windows carry the previous window's frames in the overlap
        assert any(((c[:, :, m[0, 0, :, 0, 0].bool()] >= 1) & (c[:, :, m[0, 0, :, 0, 0].bool()] % 1 == 0)).any()
                   for c, m in calls[1:])
