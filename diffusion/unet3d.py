"""The factorized 3D U-Net of Ho et al. 2022 ("Video Diffusion Models") for video latents [B, C, T, h, w]."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffusion.config import UNetConfig
from diffusion.layers import (
    ClipContextAttention,
    CrossAttention,
    Downsample,
    ResBlock,
    SpaceTimeAttention,
    SpatialAttention,
    TemporalAttention,
    Upsample,
    group_norm,
    repeat_over_frames,
    timestep_embedding,
    zero_module,
)

MODEL_TYPE = "UNet3D"  # recorded in the exported config.json


class UNetBlock(nn.Module):
    """One residual block, optionally followed by spatial attention, cross-attention to text tokens
    (when the model has text), temporal attention and clip-context attention (config.clip_context)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, config: UNetConfig, attention: bool,
                 temporal: bool | None = None, joint: bool = False):
        super().__init__()
        c = config
        self.res = ResBlock(
            in_ch, out_ch, emb_dim, groups=c.norm_groups, dropout=c.dropout, temporal_conv=c.temporal_conv
        )
        joint = joint and attention
        # joint: one space-time attention in place of the spatial + temporal pair (SpaceTimeAttention)
        self.joint_attn = SpaceTimeAttention(out_ch, c.head_dim, c.norm_groups, c.max_relative_position) if joint else None
        self.spatial_attn = SpatialAttention(out_ch, c.head_dim, c.norm_groups) if attention and not joint else None
        self.cross_attn = CrossAttention(out_ch, c.text_dim, c.head_dim, c.norm_groups) if attention and c.text_dim else None
        self.temporal_attn = None
        if (attention if temporal is None else temporal) and c.temporal_attention and not joint:
            self.temporal_attn = TemporalAttention(out_ch, c.head_dim, c.norm_groups, c.max_relative_position)
        self.temporal_context = None  # "temporal" in the name: T = 1 gives it no gradient (it is skipped)
        if self.temporal_attn is not None and c.clip_context:
            self.temporal_context = ClipContextAttention(out_ch, c.head_dim, c.norm_groups, c.max_relative_position)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, num_frames: int, text=None, text_mask=None) -> torch.Tensor:
        x = self.res(x, emb, num_frames)
        if self.joint_attn is not None:
            x = self.joint_attn(x, num_frames)
        if self.spatial_attn is not None:
            x = self.spatial_attn(x, num_frames)
        if self.cross_attn is not None:
            x = self.cross_attn(x, text, text_mask, num_frames)
        if self.temporal_attn is not None:
            x = self.temporal_attn(x, num_frames)  # identity, no compute, when num_frames == 1
        if self.temporal_context is not None:
            x = self.temporal_context(x, num_frames)  # identity when num_frames == 1
        return x


class UNet3D(nn.Module):
    """ADM-style U-Net whose spatial layers run per frame and whose temporal layers (3x1x1 conv in
    each res block, relative-position temporal attention after each spatial attention) mix frames.

    forward(x [B,C,T,h,w], t [B], class_labels [B] | None, cond_frames [B,C,T,h,w] | None,
    cond_mask [B,T] or [B,1,T,1,1] | None, text [B,L,D] | None, text_mask [B,L] | None,
    low_res [B,C',T,h',w'] | None, aug_level [B] | None) -> [B,C,T,h,w] (eps, v or x0: the
    process decides).

    A super-resolution stage (config.low_res_channels > 0; Ho et al. 2021, "Cascaded Diffusion
    Models") must be given `low_res`, the noise-augmented low-resolution latents, which are
    upsampled bilinearly to x's grid and concatenated to its input channels, and `aug_level`, the
    augmentation's timestep (0 = clean), embedded like t and added to the timestep embedding.

    With text (config.text_dim > 0): a row whose text_mask is all False (or text None) is the null
    text of classifier-free guidance. Every token list gets a learned null token in front, so
    cross-attention always has a key, and the masked mean of the tokens (zero for the null text) is
    projected (zero-initialised) and added to the timestep embedding."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        base, emb_dim = c.base_channels, 4 * c.base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # index num_classes is the null label used for classifier-free guidance
        self.class_emb = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes > 0 else None
        if c.text_dim:
            self.null_token = nn.Parameter(torch.randn(1, 1, c.text_dim) * 0.02)
            self.text_pool = zero_module(nn.Linear(c.text_dim, emb_dim))
            if c.text_pool_norm:  # running statistics of the pooled text (config.text_pool_norm)
                self.register_buffer("text_pool_count", torch.zeros((), dtype=torch.long))
                self.register_buffer("text_pool_mean", torch.zeros(c.text_dim))
                self.register_buffer("text_pool_var", torch.ones(c.text_dim))
        if c.low_res_channels:  # super-resolution: the noise-augmentation level, embedded like t
            self.aug_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        in_ch = (2 * c.in_channels + 1 if c.frame_conditioning else c.in_channels) + c.low_res_channels
        in_ch += c.in_channels if c.self_condition else 0
        self.input_conv = nn.Conv2d(in_ch, base, 3, padding=1)

        ch, skips = base, [base]
        self.down = nn.ModuleList()
        temporal = c.attention_levels if c.temporal_attention_levels is None else c.temporal_attention_levels
        joint = set(c.joint_attention_levels)
        if not joint <= set(c.attention_levels):
            raise ValueError(f"joint_attention_levels {sorted(joint)} must be a subset of attention_levels "
                             f"{list(c.attention_levels)} (joint attention replaces a level's spatial + temporal pair)")
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                self.down.append(UNetBlock(ch, mult * base, emb_dim, c, level in c.attention_levels,
                                           level in temporal, joint=level in joint))
                ch = mult * base
                skips.append(ch)
            if level < len(c.channel_mult) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)

        self.middle = nn.ModuleList(
            [UNetBlock(ch, ch, emb_dim, c, attention=True, joint=len(c.channel_mult) - 1 in joint),
             UNetBlock(ch, ch, emb_dim, c, attention=False)]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                self.up.append(
                    UNetBlock(ch + skips.pop(), mult * base, emb_dim, c, level in c.attention_levels,
                              level in temporal, joint=level in joint)
                )
                ch = mult * base
                if level > 0 and i == c.num_res_blocks:
                    self.up.append(Upsample(ch))

        self.out_norm = group_norm(ch, c.norm_groups)
        self.out_conv = zero_module(nn.Conv2d(ch, c.in_channels, 3, padding=1))

    # ------------------------------------------------------------------ helpers
    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the temporal conv / temporal attention layers (no gradient from T = 1 batches)."""
        return (p for name, p in self.named_parameters() if "temporal" in name)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    def _run(self, block: nn.Module, x: torch.Tensor, emb: torch.Tensor, num_frames: int, text) -> torch.Tensor:
        if not isinstance(block, UNetBlock):
            return block(x)  # Downsample / Upsample
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, emb, num_frames, *text, use_reentrant=False)
        return block(x, emb, num_frames, *text)

    def _text(self, text, text_mask, batch: int, device) -> tuple:
        """(tokens [B, 1+L, D] with the null token first, mask [B, 1+L]) and the pooled text [B, D]."""
        d = self.config.text_dim
        if text is None:
            text, text_mask = torch.zeros(batch, 1, d, device=device), torch.zeros(batch, 1, dtype=torch.bool, device=device)
        if text.ndim != 3 or text.shape[0] != batch or text.shape[-1] != d:
            raise ValueError(f"expected text [{batch}, L, {d}], got {tuple(text.shape)}")
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=device) if text_mask is None else text_mask.to(device).bool()
        text = text.to(device).float()
        weights = mask.float()[..., None]
        pooled = (text * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # [B, D]; 0 for the null text
        if self.config.text_pool_norm:
            pooled = self._standardise(pooled, mask.any(1))
        tokens = torch.cat([self.null_token.expand(batch, 1, d), text], dim=1)
        return (tokens, torch.cat([mask.new_ones(batch, 1), mask], dim=1)), pooled

    # after this many pooled captions the running statistics become a moving average of that length
    TEXT_POOL_WINDOW = 10000

    @torch.no_grad()
    def _update_text_stats(self, rows: torch.Tensor) -> None:
        """Fold a batch of pooled captions [N, D] into the running mean and variance (Chan et al.'s
        pairwise update; the old statistics weigh min(count, TEXT_POOL_WINDOW) rows)."""
        n, m = float(min(int(self.text_pool_count), self.TEXT_POOL_WINDOW)), float(rows.shape[0])
        mean, var = rows.mean(0), rows.var(0, unbiased=False)
        delta = mean - self.text_pool_mean
        total = n + m
        new_var = (n * self.text_pool_var + m * var + delta.square() * n * m / total) / total
        self.text_pool_mean.add_(delta * (m / total))
        self.text_pool_var.copy_(new_var)
        self.text_pool_count.add_(rows.shape[0])

    def _standardise(self, pooled: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """config.text_pool_norm: (pooled - mean) / std per feature for the rows with text; the null
        text's rows stay 0. In training mode the rows with text update the statistics first; before any
        update the buffers' mean 0 and variance 1 leave the rows as they are."""
        if self.training and bool(real.any()):
            self._update_text_stats(pooled[real].detach().float())
        normed = (pooled - self.text_pool_mean) * torch.rsqrt(self.text_pool_var + 1e-6)
        return torch.where(real[:, None], normed, torch.zeros_like(normed))

    def _embed(self, t: torch.Tensor, class_labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        t = t.expand(batch) if t.ndim == 0 else t
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))  # [B, 4*base]
        if self.class_emb is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)
            emb = emb + self.class_emb(class_labels.long())
        return emb

    def _input(self, x, cond_frames, cond_mask, low_res, self_cond=None) -> torch.Tensor:
        """concat(x, cond_frames * mask, mask) over channels when frame conditioning is on, then the
        low-resolution latents upsampled to x's grid for a super-resolution stage, then the model's
        previous x0 estimate (zeros when not given) for a self-conditioned model."""
        b, _, t, h, w = x.shape
        parts = [x]
        if self.config.frame_conditioning:
            mask = torch.zeros(b, 1, t, 1, 1, dtype=x.dtype, device=x.device)
            if cond_mask is not None:
                mask = cond_mask.to(x.dtype).reshape(b, 1, t, 1, 1)
            cond = torch.zeros_like(x) if cond_frames is None else cond_frames.to(x.dtype) * mask
            parts += [cond, mask.expand(b, 1, t, h, w)]  # [B, 2C+1, T, h, w]
        if self.config.low_res_channels:
            parts.append(self._low_res(low_res, x))
        if self.config.self_condition:
            if self_cond is not None and self_cond.shape != x.shape:
                raise ValueError(f"self_cond must have x's shape {tuple(x.shape)}, got {tuple(self_cond.shape)}")
            parts.append(torch.zeros_like(x) if self_cond is None else self_cond.to(x.dtype))
        return torch.cat(parts, dim=1) if len(parts) > 1 else x

    def _low_res(self, low_res, x) -> torch.Tensor:
        b, _, t, h, w = x.shape
        want = self.config.low_res_channels
        if low_res is None:
            raise ValueError("this is a super-resolution model: give it low_res [B, C, T, h, w] (the low-resolution latents)")
        if low_res.ndim != 5 or low_res.shape[:3] != (b, want, t) or low_res.shape[3] > h or low_res.shape[4] > w:
            raise ValueError(f"expected low_res [{b}, {want}, {t}, <= {h}, <= {w}], got {tuple(low_res.shape)}")
        up = F.interpolate(rearrange(low_res.to(x.dtype), "b c t h w -> (b t) c h w"), size=(h, w), mode="bilinear",
                           align_corners=False)
        return rearrange(up, "(b t) c h w -> b c t h w", b=b)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected x [B, {self.config.in_channels}, T, h, w], got {tuple(x.shape)}")
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"latent size {tuple(x.shape[-2:])} must be divisible by {f} "
                f"(2 ** (len(channel_mult) - 1) with channel_mult={self.config.channel_mult})"
            )

    # ------------------------------------------------------------------ forward
    def forward(self, x, t, class_labels=None, cond_frames=None, cond_mask=None, text=None, text_mask=None,
                low_res=None, aug_level=None, self_cond=None) -> torch.Tensor:
        self._check(x)
        if self_cond is not None and not self.config.self_condition:
            raise ValueError("this model is not self-conditioned (model.self_condition = false) but was given self_cond")
        batch, num_frames = x.shape[0], x.shape[2]
        emb, ctx = self._embed(t, class_labels, batch, x.device), ()
        if self.config.low_res_channels:
            level = torch.zeros(batch, device=x.device) if aug_level is None else torch.as_tensor(aug_level, device=x.device)
            level = level.expand(batch) if level.ndim == 0 else level
            emb = emb + self.aug_mlp(timestep_embedding(level, self.config.base_channels))
        elif low_res is not None or aug_level is not None:
            raise ValueError("this model is not a super-resolution stage (low_res_channels = 0) but was given low_res")
        if self.config.text_dim:
            ctx, pooled = self._text(text, text_mask, batch, x.device)
            emb = emb + self.text_pool(pooled)
        elif text is not None:
            raise ValueError("this model has no text conditioning (text_dim = 0) but was given text")
        emb = repeat_over_frames(emb, num_frames)  # [(B T), D]
        h = rearrange(self._input(x, cond_frames, cond_mask, low_res, self_cond), "b c t h w -> (b t) c h w")
        h = self.input_conv(h)  # [(B T), base, h, w]

        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb, num_frames, ctx)
            skips.append(h)
        for block in self.middle:
            h = self._run(block, h, emb, num_frames, ctx)
        for block in self.up:
            if isinstance(block, UNetBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb, num_frames, ctx)

        h = self.out_conv(F.silu(self.out_norm(h)))  # [(B T), C, h, w]
        return rearrange(h, "(b t) c h w -> b c t h w", t=num_frames)
