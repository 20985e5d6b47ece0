"""Chunked video encode/decode: frame folding order, chunk-size invariance, gradients, input checks."""

from __future__ import annotations

import pytest
import torch

from autoencoder import FrameVAE, VAEConfig, decode_video, encode_video, encode_video_posterior


@pytest.fixture(scope="module")
def vae() -> FrameVAE:
    torch.manual_seed(0)
    cfg = VAEConfig(
        base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, norm_groups=4
    )
    return FrameVAE(cfg).eval()


def test_chunked_matches_unchunked_and_per_frame(vae):
    torch.manual_seed(1)
    video = torch.rand(2, 3, 7, 16, 24) * 2 - 1  # [B, 3, T, H, W]
    with torch.no_grad():
        mean3, logvar3 = encode_video(vae, video, chunk_size=3)  # chunks straddle the two clips
        mean_all, logvar_all = encode_video(vae, video, chunk_size=100)
        assert mean3.shape == logvar3.shape == (2, 4, 7, 4, 6)
        torch.testing.assert_close(mean3, mean_all, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logvar3, logvar_all, rtol=1e-5, atol=1e-5)
        q = vae.encode(video[1, :, 5][None])  # frame t=5 of clip 1 lands at [1, :, 5]
        torch.testing.assert_close(mean3[1, :, 5], q.mean[0], rtol=1e-5, atol=1e-5)

        frames3 = decode_video(vae, mean3, chunk_size=3)
        frames_all = decode_video(vae, mean3, chunk_size=100)
        assert frames3.shape == video.shape and frames3.is_contiguous()
        torch.testing.assert_close(frames3, frames_all, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            frames3[0, :, 2], vae.decode(mean3[0, :, 2][None])[0], rtol=1e-5, atol=1e-5
        )


def test_single_frame_images(vae):
    images = torch.rand(5, 3, 1, 16, 16) * 2 - 1  # images are T = 1
    with torch.no_grad():
        mean, logvar = encode_video(vae, images, chunk_size=2)
        assert mean.shape == (5, 4, 1, 4, 4)
        assert decode_video(vae, mean).shape == images.shape


def test_gradient_flows_through_encode_and_decode(vae):
    video = (torch.rand(1, 3, 3, 16, 16) * 2 - 1).requires_grad_(True)
    posterior = encode_video_posterior(vae, video, chunk_size=2)
    assert posterior.mean.shape == (1, 4, 3, 4, 4) and posterior.kl().shape == (1,)
    recon = decode_video(vae, posterior.sample(), chunk_size=2)
    (recon.square().mean() + posterior.kl().mean()).backward()
    assert video.grad is not None and torch.all(video.grad.abs().flatten(0, 1).sum(-1).sum(-1) > 0)
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0
    vae.zero_grad(set_to_none=True)


def test_bad_inputs(vae):
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        encode_video(vae, torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 4, T, H, W\]"):
        decode_video(vae, torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        encode_video(vae, torch.zeros(1, 3, 2, 16, 16), chunk_size=0)
    with pytest.raises(ValueError, match="18x16.*factor 4"):
        encode_video(vae, torch.zeros(1, 3, 2, 18, 16))
