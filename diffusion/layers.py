"""Building blocks of the factorized 3D U-Net: space-only residual blocks, spatial and temporal attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

# Layout convention inside the network: frames are folded into the batch, activations are
# [(B T), C, H, W]. Every spatial op (3x3 conv, GroupNorm, spatial attention) is then a plain
# per-frame 2D op -- the same computation for an image (T = 1) and for each frame of a clip --
# and only the temporal layers unfold the T axis. Measured on CPU (forward + backward, [2, C, 16, H, W]):
# a folded Conv2d is as fast as Conv3d(1,3,3) or faster (up to ~25% at 64 ch, 32 px, 2 threads), and
# the folded layout needs no rearrange around each GroupNorm / spatial attention.


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias so that its residual branch starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `channels` (per frame)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim] (Vaswani et al.)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def num_heads_for(channels: int, head_dim: int) -> int:
    heads = max(1, channels // head_dim)
    if channels % heads:
        raise ValueError(f"channels {channels} not divisible into {heads} heads of dim {head_dim}")
    return heads


class TemporalConv(nn.Module):
    """Residual branch GroupNorm -> SiLU -> 3x1x1 conv over frames; the conv is zero-initialised so
    the branch adds nothing at init and a pretrained per-frame model is unchanged."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        # A 3x1x1 conv over (T, H, W) is a 3x1 conv over (T, H*W): the same operator, but Conv2d takes
        # the oneDNN path on CPU (Conv3d's CPU kernel made this layer ~15% of a demo training step).
        self.conv = zero_module(nn.Conv2d(channels, channels, (3, 1), padding=(1, 0)))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = F.silu(self.norm(x))  # [(B T), C, H, W]
        height = h.shape[-2]
        h = rearrange(h, "(b t) c h w -> b c t (h w)", t=num_frames)
        h = self.conv(h)  # mixes frames t-1, t, t+1 at each pixel
        return rearrange(h, "b c t (h w) -> (b t) c h w", h=height)


class ResBlock(nn.Module):
    """ADM residual block with space-only 3x3 convs, FiLM from the timestep/class embedding
    (norm(h) * (1 + scale) + shift), and an optional temporal 3-tap conv branch (skipped at T = 1)."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, *, groups: int, dropout: float, temporal_conv: bool
    ):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.temporal_conv = TemporalConv(out_ch, groups) if temporal_conv else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, num_frames: int) -> torch.Tensor:
        # x [(B T), C_in, H, W]; emb [(B T), D] (already repeated over frames)
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        h = self.skip(x) + h
        if self.temporal_conv is not None and num_frames > 1:
            h = h + self.temporal_conv(h, num_frames)
        return h  # [(B T), C_out, H, W]


class SpatialAttention(nn.Module):
    """Pre-norm multi-head self-attention over the H*W positions of each frame (residual)."""

    def __init__(self, channels: int, head_dim: int, groups: int):
        super().__init__()
        self.heads = num_heads_for(channels, head_dim)
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out_proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        height = x.shape[-2]
        h = rearrange(self.norm(x), "bt c h w -> bt (h w) c")  # [(B T), HW, C]
        q, k, v = rearrange(self.qkv(h), "n l (k h d) -> k n h l d", k=3, h=self.heads)
        h = F.scaled_dot_product_attention(q, k, v)  # [(B T), heads, HW, d]
        h = self.out_proj(rearrange(h, "n h l d -> n l (h d)"))
        return x + rearrange(h, "bt (h w) c -> bt c h w", h=height)


class CrossAttention(nn.Module):
    """Pre-norm multi-head attention from the H*W positions of each frame to text tokens (residual,
    out-projection zero-initialised). context [B, L, D] and mask [B, L] (True = a real token) are
    shared by the frames of a clip; every row must have at least one True (UNet3D adds a learned
    null token)."""

    def __init__(self, channels: int, context_dim: int, head_dim: int, groups: int):
        super().__init__()
        self.heads = num_heads_for(channels, head_dim)
        self.norm = group_norm(channels, groups)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out_proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor, num_frames: int) -> torch.Tensor:
        height = x.shape[-2]
        q = rearrange(self.q(rearrange(self.norm(x), "bt c h w -> bt (h w) c")), "n l (h d) -> n h l d", h=self.heads)
        k, v = rearrange(self.kv(context.to(q.dtype)), "b s (k h d) -> k b h s d", k=2, h=self.heads)
        k, v = k.repeat_interleave(num_frames, 0), v.repeat_interleave(num_frames, 0)  # [(B T), heads, L, d]
        attn_mask = mask.repeat_interleave(num_frames, 0)[:, None, None, :]  # [(B T), 1, 1, L]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [(B T), heads, HW, d]
        h = self.out_proj(rearrange(h, "n h l d -> n l (h d)"))
        return x + rearrange(h, "bt (h w) c -> bt c h w", h=height)


def relative_position_bias(table: torch.Tensor, num_frames: int, max_relative_position: int, device) -> torch.Tensor:
    """table [heads, 2R+1] -> additive bias [heads, T, T] whose entry (i, j) is table[:, clamp(j - i, -R, R)]."""
    pos = torch.arange(num_frames, device=device)
    rel = (pos[None, :] - pos[:, None]).clamp(-max_relative_position, max_relative_position)
    return table[:, rel + max_relative_position]


class TemporalAttention(nn.Module):
    """Pre-norm multi-head self-attention over the T frames at each pixel, with a learned relative
    position bias per head indexed by clamp(j - i, -R, R) (T5 / Ho et al. 2022), so it carries no
    absolute positions and runs at clip lengths other than the training one. The out-projection is
    zero-initialised: at init the block is the identity. Skipped at T = 1 (images)."""

    def __init__(self, channels: int, head_dim: int, groups: int, max_relative_position: int):
        super().__init__()
        self.heads = num_heads_for(channels, head_dim)
        self.max_relative_position = max_relative_position
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.relative_bias = nn.Parameter(torch.zeros(self.heads, 2 * max_relative_position + 1))
        self.out_proj = zero_module(nn.Linear(channels, channels))

    def position_bias(self, num_frames: int, device) -> torch.Tensor:
        """Additive attention bias [heads, T, T]: entry (i, j) = bias[clamp(j - i, -R, R)]."""
        return relative_position_bias(self.relative_bias, num_frames, self.max_relative_position, device)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        if num_frames == 1:
            return x
        height, width = x.shape[-2:]
        h = rearrange(self.norm(x), "(b t) c h w -> (b h w) t c", t=num_frames)  # [(B H W), T, C]
        q, k, v = rearrange(self.qkv(h), "n t (k h d) -> k n h t d", k=3, h=self.heads)
        bias = self.position_bias(num_frames, x.device).to(q.dtype)  # [heads, T, T]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [(B H W), heads, T, d]
        h = self.out_proj(rearrange(h, "n h t d -> n t (h d)"))
        return x + rearrange(h, "(b h w) t c -> (b t) c h w", h=height, w=width)


class ClipContextAttention(nn.Module):
    """Every position of every frame attends to one summary per frame of its clip: one hop from any
    pixel of frame t to what frame t' holds anywhere, where the factorized pair needs two (across the
    frame, then along a pixel's frames) and a small moving object is at another pixel in every frame.
    Each frame's summary is an attention pool over its pixels (content-based weights per head, so it
    can pick out the object among background); queries are the positions, keys and values the T
    summaries, with TemporalAttention's learned relative frame bias. Cost per clip T*H*W*T, about that
    of temporal attention. Out-projection zero-initialised (identity at init); skipped at T = 1."""

    def __init__(self, channels: int, head_dim: int, groups: int, max_relative_position: int):
        super().__init__()
        self.heads = num_heads_for(channels, head_dim)
        self.max_relative_position = max_relative_position
        self.norm = group_norm(channels, groups)
        self.pool = nn.Linear(channels, self.heads)  # pooling logits, one per head
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.relative_bias = nn.Parameter(torch.zeros(self.heads, 2 * max_relative_position + 1))
        self.out_proj = zero_module(nn.Linear(channels, channels))

    def summaries(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, H*W, C] -> [B, T, C]: per head, a softmax-weighted mean of the frame's positions."""
        weights = self.pool(h).softmax(dim=2)  # [B, T, HW, heads]
        heads = rearrange(h, "b t l (h d) -> b t l h d", h=self.heads)
        return rearrange(torch.einsum("btlh,btlhd->bthd", weights, heads), "b t h d -> b t (h d)")

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        if num_frames == 1:
            return x
        height, width = x.shape[-2:]
        h = rearrange(self.norm(x), "(b t) c h w -> b t (h w) c", t=num_frames)  # [B, T, HW, C]
        k, v = rearrange(self.kv(self.summaries(h)), "b t (k h d) -> k b h t d", k=2, h=self.heads)
        q = rearrange(self.q(h), "b t l (h d) -> b h (t l) d", h=self.heads)  # [B, heads, T*HW, d]
        bias = relative_position_bias(self.relative_bias, num_frames, self.max_relative_position, x.device)
        # Attention with the T keys on the rows: [B, heads, T keys, T*HW queries]. The same softmax(qk^T/√d
        # + bias) v as SDPA with a [heads, T*HW, T] mask, 13-18% faster per layer (forward + backward) on
        # CPU here: a matmul with only T = 8 output columns runs at a fraction of the speed of one with
        # T*HW, and the frame bias is broadcast over a query frame's HW positions, not materialised.
        scores = torch.matmul(k, q.transpose(-1, -2)) * q.shape[-1] ** -0.5
        scores = scores.unflatten(-1, (num_frames, height * width)) + bias.transpose(-1, -2)[None, :, :, :, None].to(q.dtype)
        weights = scores.softmax(dim=2).flatten(-2)  # over the keys
        h = torch.matmul(weights.transpose(-1, -2), v)  # [B, heads, T*HW, d]
        h = self.out_proj(rearrange(h, "b h l d -> b l (h d)"))
        return x + rearrange(h, "b (t h w) c -> (b t) c h w", t=num_frames, h=height, w=width)


class SpaceTimeAttention(nn.Module):
    """Pre-norm multi-head self-attention over all T*H*W positions of a clip at once (joint
    space-time attention), replacing a level's spatial + temporal attention pair: an object at one
    place in frame t attends directly to where it is in frame t', which the factorized pair reaches
    only in two hops (across the frame, then along the pixel's own frames). The learned relative
    frame-position bias of TemporalAttention is shared by every pair of pixels of two frames, so it
    runs at other clip lengths. At T = 1 it is exactly spatial attention (no bias: a constant over
    the keys changes nothing), so images train the same weights. Out-projection zero-initialised.
    Cost per clip (T*H*W)^2 instead of T*(H*W)^2: meant for the coarse levels."""

    def __init__(self, channels: int, head_dim: int, groups: int, max_relative_position: int):
        super().__init__()
        self.heads = num_heads_for(channels, head_dim)
        self.max_relative_position = max_relative_position
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        # "temporal" in the name: images (T = 1) give it no gradient, like the temporal layers
        self.temporal_bias = nn.Parameter(torch.zeros(self.heads, 2 * max_relative_position + 1))
        self.out_proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = rearrange(self.norm(x), "(b t) c h w -> b (t h w) c", t=num_frames)  # [B, T*H*W, C]
        q, k, v = rearrange(self.qkv(h), "n l (k h d) -> k n h l d", k=3, h=self.heads)
        bias = None
        if num_frames > 1:
            frames = relative_position_bias(self.temporal_bias, num_frames, self.max_relative_position, x.device)
            hw = height * width  # [heads, T, T] -> [heads, T*H*W, T*H*W], constant within a frame pair
            bias = frames.repeat_interleave(hw, dim=1).repeat_interleave(hw, dim=2).to(q.dtype)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, heads, T*H*W, d]
        h = self.out_proj(rearrange(h, "n h l d -> n l (h d)"))
        return x + rearrange(h, "b (t h w) c -> (b t) c h w", t=num_frames, h=height, w=width)


class Downsample(nn.Module):
    """Stride-2 3x3 conv over H, W of each frame (T untouched)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # [(B T), C, H/2, W/2]


class Upsample(nn.Module):
    """Nearest-neighbour x2 over H, W of each frame, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [(B T), C, 2H, 2W]


def repeat_over_frames(emb: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[B, D] -> [(B T), D], matching the folded frame layout."""
    return repeat(emb, "b d -> (b t) d", t=num_frames)
