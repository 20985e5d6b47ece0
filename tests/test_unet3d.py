"""UNet3D: shapes, conditioning, temporal layers skipped for images, relative temporal attention, checkpointing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from diffusion.config import UNetConfig
from diffusion.layers import TemporalAttention
from diffusion.unet3d import MODEL_TYPE, UNet3D

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> UNetConfig:
    kw = dict(
        in_channels=4,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        head_dim=8,
        norm_groups=8,
        max_relative_position=4,
        num_classes=0,
        frame_conditioning=False,
    )
    kw.update(overrides)
    return UNetConfig(**kw)


def randomize(model: torch.nn.Module, skip: str | None = None, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (whose name does not contain `skip`), so zero-initialised layers act."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if skip is None or skip not in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def build(seed: int = 0, **overrides) -> UNet3D:
    torch.manual_seed(seed)
    return UNet3D(tiny_config(**overrides))


def inputs(batch=2, frames=8, size=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, frames, size, size, generator=gen), torch.tensor([10, 700])[:batch]


@pytest.mark.parametrize("frames", [1, 5, 8])
@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("frame_conditioning", [False, True])
def test_output_shape(frames, num_classes, frame_conditioning):
    model = build(num_classes=num_classes, frame_conditioning=frame_conditioning).eval()
    x, t = inputs(frames=frames)
    kwargs = {}
    if num_classes:
        kwargs["class_labels"] = torch.tensor([0, 2])
    if frame_conditioning:
        kwargs["cond_frames"] = torch.randn_like(x)
        kwargs["cond_mask"] = (torch.arange(frames) < frames // 2).float().expand(2, frames)
    with torch.no_grad():
        out = model(x, t, **kwargs)
        out_none = model(x, t)  # conditioning is optional: null label / no known frames
    assert out.shape == x.shape == out_none.shape
    assert torch.isfinite(out).all()


def test_conditioning_inputs_are_used():
    model = randomize(build(num_classes=3, frame_conditioning=True)).eval()
    x, t = inputs(frames=4)
    cond = torch.randn_like(x)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2)
    with torch.no_grad():
        base = model(x, t, torch.tensor([0, 1]), cond, mask)
        assert not torch.allclose(base, model(x, t, torch.tensor([2, 1]), cond, mask))
        # None is the null label num_classes
        assert torch.equal(model(x, t), model(x, t, torch.tensor([3, 3])))
        # both mask layouts mean the same; frames marked unknown are ignored
        cond2 = cond.clone()
        cond2[:, :, 2:] = 100.0
        assert torch.equal(base, model(x, t, torch.tensor([0, 1]), cond2, mask[:, None, :, None, None]))
        assert not torch.allclose(base, model(x, t, torch.tensor([0, 1]), cond, torch.ones(2, 4)))
        # no conditioning == all-zero mask
        assert torch.allclose(model(x, t), model(x, t, None, cond, torch.zeros(2, 4)))
        # float and int timesteps both work and t matters
        assert torch.allclose(base, model(x, t.float(), torch.tensor([0, 1]), cond, mask))
        assert not torch.allclose(base, model(x, t + 200, torch.tensor([0, 1]), cond, mask))


def test_rejects_latent_size_not_divisible_by_downsampling():
    model = build(channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 4, 2, 6, 6), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"expected x \[B, 4"):
        model(torch.randn(1, 3, 2, 8, 8), torch.tensor([1]))


def test_temporal_parameters_are_named_and_counted():
    model = build()
    names = [n for n, _ in model.named_parameters() if "temporal" in n]
    assert any("temporal_conv" in n for n in names) and any("temporal_attn" in n for n in names)
    assert sum(p.numel() for p in model.temporal_parameters()) == sum(
        p.numel() for n, p in model.named_parameters() if "temporal" in n
    )
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert MODEL_TYPE == type(model).__name__


def _grads(model, frames):
    model.zero_grad(set_to_none=True)
    x, t = inputs(frames=frames)
    cond, _ = inputs(frames=frames, seed=2)
    model(x, t, cond_frames=cond, cond_mask=torch.ones(2, frames)).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_images_give_no_gradient_to_temporal_parameters():
    model = randomize(build(frame_conditioning=True)).train()
    grads = _grads(model, frames=1)
    for name, g in grads.items():
        if "temporal" in name:
            assert g is None or not g.any(), name
        else:
            assert g is not None and g.abs().sum() > 0, name
    # the same check on a clip does reach every temporal parameter
    grads = _grads(model, frames=4)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "temporal" in n)


def _without_temporal(model: UNet3D, **changes) -> UNet3D:
    """A copy of `model` built with temporal layers disabled, sharing every other weight."""
    cfg = tiny_config(**{**model.config.to_dict(), **changes})
    other = UNet3D(cfg)
    result = other.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    assert result.unexpected_keys and all("temporal" in k for k in result.unexpected_keys)
    return other.eval()


def test_images_equal_model_without_temporal_layers():
    model = randomize(build(num_classes=3)).eval()  # temporal layers non-zero: they would act if run
    spatial_only = _without_temporal(model, temporal_conv=False, temporal_attention=False)
    with torch.no_grad():
        x, t = inputs(frames=1)
        assert torch.equal(model(x, t, torch.tensor([1, 2])), spatial_only(x, t, torch.tensor([1, 2])))
        x, t = inputs(frames=4)  # sanity: on clips the temporal layers do change the output
        assert not torch.allclose(model(x, t), spatial_only(x, t), atol=1e-4)


def test_zero_initialised_temporal_conv_changes_nothing_at_init():
    model = randomize(build(), skip="temporal_conv").eval()  # temporal convs keep their zero init
    without = _without_temporal(model, temporal_conv=False)
    x, t = inputs(frames=6)
    with torch.no_grad():
        assert torch.equal(model(x, t), without(x, t))
        randomize(model, seed=3)
        assert not torch.allclose(model(x, t), without(x, t), atol=1e-4)


def test_temporal_attention_is_shift_equivariant():
    torch.manual_seed(0)
    radius = 3
    attn = randomize(TemporalAttention(16, head_dim=8, groups=8, max_relative_position=radius)).eval()
    with torch.no_grad():
        # clamped end buckets (|j - i| >= radius) get -inf-like bias: attention is local, |j - i| < radius
        attn.relative_bias[:, 0] = -1e4
        attn.relative_bias[:, -1] = -1e4
    length, shift = 12, 2
    seq = torch.randn(1, 16, length + shift, 2, 2)  # [B, C, T, H, W]

    def run(clip):  # [1, C, T, H, W] -> [T, C, H, W] (folded layout, B = 1)
        return attn(clip[0].transpose(0, 1).contiguous(), clip.shape[2])

    with torch.no_grad():
        a = run(seq[:, :, :length])  # global frames 0 .. length-1
        b = run(seq[:, :, shift : shift + length])  # global frames shift .. shift+length-1
    # global frame g is a[g] and b[g - shift]; its window g-2 .. g+2 lies inside both clips for:
    interior = range(shift + radius - 1, length - radius + 1)
    assert len(interior) >= 4
    for g in interior:
        torch.testing.assert_close(a[g], b[g - shift], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[shift], b[0], atol=1e-3)  # near the edge the windows differ


def test_runs_at_other_clip_lengths():
    model = randomize(build()).eval()
    with torch.no_grad():
        x, t = inputs(frames=8)
        out8 = model(x, t)
        x16 = torch.cat([x, x], dim=2)  # 16 frames > 2 * max_relative_position + 1 buckets
        out16 = model(x16, t)
    assert out16.shape == x16.shape and torch.isfinite(out16).all()
    assert not torch.allclose(out16[:, :, :8], out8, atol=1e-4)  # frames 8..15 are seen by frames 0..7


def test_gradient_checkpointing_gives_same_gradients(monkeypatch):
    import diffusion.unet3d as unet3d

    calls = []
    real = unet3d.checkpoint
    monkeypatch.setattr(unet3d, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = randomize(build(frame_conditioning=True, dropout=0.0)).train()
    ckpt = UNet3D(tiny_config(**{**model.config.to_dict(), "gradient_checkpointing": True})).train()
    ckpt.load_state_dict(model.state_dict())
    ref = _grads(model, frames=4)
    assert not calls
    got = _grads(ckpt, frames=4)
    assert calls  # the checkpointed path really ran
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", ["diffusion/unet3d.py", "diffusion/layers.py"])
def test_network_imports_no_process_sampler_or_other_stage(path):
    banned = (
        "diffusion.process",
        "diffusion.sampling",
        "diffusion.guidance",
        "autoencoder",
        "data",
        "scripts",
    )
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            assert not name.startswith(banned), f"{path} imports {name}"


def test_temporal_attention_levels_apart_from_spatial():
    """temporal_attention_levels puts temporal attention at levels without spatial attention (it is
    cheap at fine levels); the default keeps them together, and the key is absent from the dict."""

    def where(model, kind):
        return {name.split(".")[0] + "." + name.split(".")[1] for name, m in model.named_modules()
                if name.endswith(kind) and m is not None and not name.startswith("middle")}

    default = UNet3D(tiny_config())
    assert "temporal_attention_levels" not in default.config.to_dict()
    assert where(default, "temporal_attn") == where(default, "spatial_attn") == {"down.2", "up.0", "up.1"}
    cfg = tiny_config(temporal_attention_levels=(0, 1))
    apart = randomize(UNet3D(cfg))
    assert where(apart, "spatial_attn") == {"down.2", "up.0", "up.1"}
    assert where(apart, "temporal_attn") == {"down.0", "down.2", "up.0", "up.1", "up.3", "up.4"}  # up.2: Upsample
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with torch.no_grad():  # clips and images (T = 1 skips every temporal layer) both run
        assert apart(torch.randn(2, 4, 5, 8, 8), torch.tensor([10, 500])).shape == (2, 4, 5, 8, 8)
        assert apart(torch.randn(2, 4, 1, 8, 8), torch.tensor([10, 500])).shape == (2, 4, 1, 8, 8)


def _attention_weights(src, dst) -> None:
    """Copy norm / qkv / out_proj from one attention layer to another."""
    dst.norm.load_state_dict(src.norm.state_dict())
    dst.qkv.load_state_dict(src.qkv.state_dict())
    dst.out_proj.load_state_dict(src.out_proj.state_dict())


def test_space_time_attention_against_a_hand_written_softmax():
    """SpaceTimeAttention attends over every (frame, pixel) of a clip, with bias[clamp(t_j - t_i)]
    added to every pair of pixels of frames t_i, t_j; checked against an explicit softmax."""
    from diffusion.layers import SpaceTimeAttention

    torch.manual_seed(0)
    attn = randomize(SpaceTimeAttention(16, head_dim=8, groups=4, max_relative_position=2))
    frames, size = 4, 3
    x = torch.randn(2 * frames, 16, size, size)
    with torch.no_grad():
        out = attn(x, frames)
        h = attn.norm(x).reshape(2, frames, 16, size * size).permute(0, 1, 3, 2).reshape(2, frames * size * size, 16)
        q, k, v = attn.qkv(h).chunk(3, dim=-1)
        heads = [slice(0, 8), slice(8, 16)]
        t_of = torch.arange(frames).repeat_interleave(size * size)  # frame of each token
        rel = (t_of[None, :] - t_of[:, None]).clamp(-2, 2) + 2
        rows = []
        for i, sl in enumerate(heads):
            logits = q[..., sl] @ k[..., sl].transpose(1, 2) / 8**0.5 + attn.temporal_bias[i][rel]
            rows.append(torch.softmax(logits, dim=-1) @ v[..., sl])
        want = attn.out_proj(torch.cat(rows, dim=-1))  # [2, T*H*W, C]
        want = want.reshape(2, frames, size * size, 16).permute(0, 1, 3, 2).reshape(2 * frames, 16, size, size)
    assert torch.allclose(out, x + want, atol=1e-5)


def test_space_time_attention_reduces_to_spatial_attention():
    """At T = 1 joint attention is the spatial attention with the same weights (images train the same
    layer); with a bias that forbids other frames it is spatial attention applied frame by frame."""
    from diffusion.layers import SpaceTimeAttention, SpatialAttention

    torch.manual_seed(0)
    joint = randomize(SpaceTimeAttention(16, head_dim=8, groups=4, max_relative_position=3))
    spatial = SpatialAttention(16, head_dim=8, groups=4)
    _attention_weights(joint, spatial)
    x = torch.randn(6, 16, 4, 4)
    with torch.no_grad():
        assert torch.allclose(joint(x, 1), spatial(x, 1), atol=1e-6)
        joint.temporal_bias.fill_(-1e4)
        joint.temporal_bias[:, 3] = 0.0  # relative position 0: the frame itself
        assert torch.allclose(joint(x, 3), spatial(x, 3), atol=1e-5)
        joint.temporal_bias.zero_()  # now frames see each other: the result changes
        assert not torch.allclose(joint(x, 3), spatial(x, 3), atol=1e-3)


def test_joint_attention_levels():
    """joint_attention_levels swaps a level's spatial + temporal pair (and the middle block's, at the
    coarsest level) for one SpaceTimeAttention; images give its frame bias no gradient; the key is
    absent from the dict when unused; levels without attention are refused."""

    def where(model, kind):
        return {name.rsplit(".", 1)[0] for name, _ in model.named_modules() if name.endswith(kind)}

    cfg = tiny_config(attention_levels=(0, 1), joint_attention_levels=(1,), frame_conditioning=True)
    model = randomize(UNet3D(cfg)).train()
    assert where(model, "joint_attn") == {"down.2", "middle.0", "up.0", "up.1"}
    assert where(model, "spatial_attn") == where(model, "temporal_attn") == {"down.0", "up.3", "up.4"}
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    assert "joint_attention_levels" not in tiny_config().to_dict()
    grads = _grads(model, frames=1)
    assert all(g is None or not g.any() for n, g in grads.items() if "temporal" in n)
    assert grads["down.2.joint_attn.qkv.weight"].abs().sum() > 0  # images do train the joint attention
    grads = _grads(model, frames=4)
    assert grads["down.2.joint_attn.temporal_bias"].abs().sum() > 0
    with pytest.raises(ValueError, match="subset of attention_levels"):
        UNet3D(tiny_config(attention_levels=(1,), joint_attention_levels=(0,)))


def test_joint_attention_links_a_pixel_to_other_places_in_other_frames_in_one_layer():
    """What it is for: one joint attention layer carries a change at one pixel of frame 0 to other
    pixels of frame 2; the factorized pair (spatial, then temporal attention) needs both layers, and
    either alone cannot (spatial: stays in its frame; temporal: stays at its pixel)."""
    from diffusion.layers import SpaceTimeAttention, SpatialAttention

    torch.manual_seed(0)
    joint = randomize(SpaceTimeAttention(16, head_dim=8, groups=16, max_relative_position=3))
    spatial = randomize(SpatialAttention(16, head_dim=8, groups=16))
    temporal = randomize(TemporalAttention(16, head_dim=8, groups=16, max_relative_position=3))
    for layer in (joint, spatial, temporal):
        layer.norm = torch.nn.Identity()  # GroupNorm's per-frame statistics would spread the change by themselves
    x = torch.randn(3, 16, 4, 4)  # one clip of 3 frames
    y = x.clone()
    y[0, :, 0, 0] += 1.0  # frame 0, pixel (0, 0)

    def reach(layer):
        with torch.no_grad():
            d = (layer(y, 3) - layer(x, 3)).abs()
        return d[2, :, 3, 3].max().item()  # frame 2, pixel (3, 3)

    assert reach(joint) > 1e-4
    assert reach(spatial) < 1e-6 and reach(temporal) < 1e-6


def test_self_condition_input_is_used_and_checked():
    model = randomize(build(frame_conditioning=True, self_condition=True)).eval()
    x, t = inputs(frames=3)
    est = torch.randn_like(x)
    with torch.no_grad():
        base = model(x, t, self_cond=est)
        assert not torch.allclose(base, model(x, t, self_cond=est + 1.0))  # the estimate reaches the output
        assert torch.equal(model(x, t), model(x, t, self_cond=torch.zeros_like(x)))  # none = zeros
        with pytest.raises(ValueError, match="self_cond must have"):
            model(x, t, self_cond=est[:, :, :2])
        with pytest.raises(ValueError, match="not self-conditioned"):
            randomize(build()).eval()(x, t, self_cond=est)
    assert model.input_conv.in_channels == 4 + 4 + 1 + 4  # x, known frames, mask, estimate
    assert "self_condition" not in tiny_config().to_dict()  # as before the key existed
    d = tiny_config(self_condition=True).to_dict()
    assert d["self_condition"] is True and UNetConfig.from_dict(d).self_condition is True


def test_clip_context_against_a_hand_written_softmax():
    """ClipContextAttention: each frame pooled per head with softmax weights over its pixels, then
    every (frame, pixel) attends to the T pooled summaries with bias[clamp(t_j - t_i)]; checked
    against an explicit loop over clips, frames and heads."""
    from diffusion.layers import ClipContextAttention

    torch.manual_seed(0)
    attn = randomize(ClipContextAttention(16, head_dim=8, groups=4, max_relative_position=2))
    frames, size, d = 4, 3, 8
    x = torch.randn(2 * frames, 16, size, size)
    with torch.no_grad():
        out = attn(x, frames)
        want = torch.zeros_like(x)
        for b in range(2):
            h = attn.norm(x[b * frames:(b + 1) * frames]).flatten(2).transpose(1, 2)  # [T, HW, C]
            summary = torch.zeros(frames, 16)
            for t in range(frames):
                w = attn.pool(h[t]).softmax(dim=0)  # [HW, heads]
                for head in range(2):
                    sl = slice(head * d, (head + 1) * d)
                    summary[t, sl] = (w[:, head:head + 1] * h[t][:, sl]).sum(0)
            k, v = attn.kv(summary).chunk(2, dim=-1)  # [T, C]
            for t in range(frames):
                q = attn.q(h[t])  # [HW, C]
                rows = []
                for head in range(2):
                    sl = slice(head * d, (head + 1) * d)
                    bias = torch.stack([attn.relative_bias[head][max(-2, min(2, j - t)) + 2] for j in range(frames)])
                    rows.append(torch.softmax(q[:, sl] @ k[:, sl].T / d**0.5 + bias, dim=-1) @ v[:, sl])
                o = attn.out_proj(torch.cat(rows, dim=-1))  # [HW, C]
                want[b * frames + t] = o.T.reshape(16, size, size)
    assert torch.allclose(out, x + want, atol=1e-5)


def test_clip_context_reaches_other_pixels_of_other_frames_in_one_layer():
    """The point of the layer: a change at one pixel of frame 0 moves another pixel of the last frame
    through this one layer; temporal attention alone cannot (it mixes a pixel's own frames only).
    The identity at init (zero out-projection) and for images (T = 1)."""
    from diffusion.layers import ClipContextAttention

    torch.manual_seed(0)
    frames = 4
    x = torch.randn(frames, 16, 4, 4)
    moved = x.clone()
    moved[0, :, 0, 0] += 3.0  # frame 0, pixel (0, 0)
    fresh = ClipContextAttention(16, head_dim=8, groups=4, max_relative_position=2)
    with torch.no_grad():
        assert torch.equal(fresh(x, frames), x)
        assert torch.equal(fresh(x[:1], 1), x[:1])
        for layer in (randomize(fresh), randomize(TemporalAttention(16, head_dim=8, groups=4, max_relative_position=2))):
            layer.norm = torch.nn.Identity()  # GroupNorm's frame statistics would carry any change everywhere
            change = (layer(moved, frames) - layer(x, frames))[-1, :, 3, 3].abs().max()
            if isinstance(layer, ClipContextAttention):
                assert change > 1e-3
            else:
                assert change == 0


def test_clip_context_is_a_temporal_layer_and_optional_in_config():
    """model.clip_context adds the layer after every temporal attention; its parameters count as
    temporal (images give them no gradient); config.json has no key for it when it is off."""
    plain, with_context = build(), build(clip_context=True)
    assert "clip_context" not in plain.config.to_dict()
    assert with_context.config.to_dict()["clip_context"] is True
    assert UNetConfig.from_dict(with_context.config.to_dict()) == with_context.config
    extra = {n for n, _ in with_context.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert extra and all("temporal_context" in n for n in extra)
    blocks = [m for m in with_context.modules() if getattr(m, "temporal_attn", None) is not None]
    assert blocks and all(b.temporal_context is not None for b in blocks)
    model = randomize(build(clip_context=True, frame_conditioning=True)).train()
    grads = _grads(model, frames=1)
    assert all(g is None or not g.any() for n, g in grads.items() if "temporal_context" in n)
    grads = _grads(model, frames=4)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "temporal_context" in n)
