"""The reference models of the throughput benchmark: diffusers' AutoencoderKL and
UNet3DConditionModel built at the widths of one of our configs, beside our own FrameVAE and
UNet3D, each returned with the call the benchmark times.

Matched means: the same channels per level, residual blocks per level and norm groups, and
attention at the same levels as ours (`model.attention_levels`; both also attend in the middle
block), so that the time ratio compares like with like. What cannot be matched is said where it
is built (diffusers' attention blocks also carry a cross-attention and a feed-forward layer)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def model_section(kind: str, name: str) -> dict:
    """The `model:` section of configs/KIND/NAME.yaml (lists as tuples)."""
    import yaml

    section = yaml.safe_load((ROOT / "configs" / kind / f"{name}.yaml").read_text())["model"]
    return {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}


def build_vae(impl: str, config: str):
    if impl == "ours":
        from autoencoder.config import VAEConfig
        from autoencoder.model import FrameVAE

        vae = FrameVAE(VAEConfig(**model_section("autoencoder", config)))
        return vae, (lambda x: vae.encode(x).mode()), vae.decode, vae.downsample_factor
    from diffusers import AutoencoderKL

    c = model_section("autoencoder", config)
    levels = len(c["channel_mult"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=c["num_res_blocks"],
        block_out_channels=tuple(c["base_channels"] * m for m in c["channel_mult"]), latent_channels=4,
        norm_num_groups=c["norm_groups"], mid_block_add_attention=c.get("mid_attention", True),
    )  # fmt: skip
    return vae, (lambda x: vae.encode(x).latent_dist.mode()), (lambda z: vae.decode(z).sample), 2 ** (levels - 1)


def unet_block_types(levels: int, attention_levels) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """diffusers' (down_block_types, up_block_types) with attention exactly at `attention_levels`
    (up blocks run from the lowest resolution up)."""
    attn = set(attention_levels)
    down = tuple("CrossAttnDownBlock3D" if i in attn else "DownBlock3D" for i in range(levels))
    up = tuple("CrossAttnUpBlock3D" if i in attn else "UpBlock3D" for i in reversed(range(levels)))
    return down, up


TEXT_TOKENS = 32  # tokens per prompt in the text rows (text.max_length's default)


def build_unet(impl: str, config: str, gc: bool, text: int = 0):
    """(module, call(x, t) -> output) for our UNet3D or diffusers' UNet3DConditionModel at matched
    width. `text` > 0: both cross-attend to TEXT_TOKENS random tokens of that width (a T5-base
    prompt is 768 wide), ours after its spatial attention, diffusers' in its transformer blocks."""
    import torch

    c = model_section("diffusion", config)
    if impl == "ours":
        from diffusion.config import UNetConfig
        from diffusion.unet3d import UNet3D

        net = UNet3D(UNetConfig(**{**c, "in_channels": 4, "gradient_checkpointing": gc, "text_dim": text}))
        if not text:
            return net, lambda x, t: net(x, t)
        tokens = {}

        def call_text(x, t):
            if "e" not in tokens:
                tokens["e"] = torch.randn(x.shape[0], TEXT_TOKENS, text, device=x.device)
                tokens["m"] = torch.ones(x.shape[0], TEXT_TOKENS, dtype=torch.bool, device=x.device)
            return net(x, t, text=tokens["e"], text_mask=tokens["m"])

        return net, call_text
    from diffusers import UNet3DConditionModel

    # attention at our levels (diffusers' default puts it at every level but the lowest); a context of
    # one token for its cross-attention, which ours does not have
    levels, ctx_dim, ctx_len = len(c["channel_mult"]), text or 64, TEXT_TOKENS if text else 1
    down, up = unet_block_types(levels, c["attention_levels"])
    net = UNet3DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=c["num_res_blocks"],
        block_out_channels=tuple(c["base_channels"] * m for m in c["channel_mult"]),
        down_block_types=down, up_block_types=up,
        norm_num_groups=c["norm_groups"], cross_attention_dim=ctx_dim,
        attention_head_dim=8,  # diffusers' naming quirk: this is the number of heads (8 x 32 at 256 ch)
    )  # fmt: skip
    if gc:
        net.enable_gradient_checkpointing()
    context = {}

    def call(x, t):
        if "e" not in context:
            context["e"] = torch.randn(x.shape[0], ctx_len, ctx_dim, device=x.device)
        return net(x, t, encoder_hidden_states=context["e"]).sample

    return net, call
