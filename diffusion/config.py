"""Typed configuration of the factorized 3D U-Net and of the Gaussian diffusion process."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class UNetConfig:
    """Architecture of `UNet3D` (diffusion/unet3d.py)."""

    in_channels: int = 4  # latent channels
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    # levels (indices into channel_mult) that get spatial + temporal attention after each res block
    attention_levels: tuple[int, ...] = (2, 3)
    # levels that get temporal attention; None: the same as attention_levels. Temporal attention is
    # cheap at any level (T tokens per pixel); spatial attention at a fine level is not.
    temporal_attention_levels: tuple[int, ...] | None = None
    # attention levels whose spatial + temporal attention pair is one joint space-time attention over
    # all T*H*W positions of a clip (layers.SpaceTimeAttention); a subset of attention_levels. ()
    # keeps the model factorized (Ho et al.). Costs (T*H*W)^2 per clip: for the coarse levels
    joint_attention_levels: tuple[int, ...] = ()
    head_dim: int = 32
    norm_groups: int = 32
    dropout: float = 0.0
    temporal_conv: bool = True  # zero-initialised 3x1x1 conv per res block, skipped when T == 1
    temporal_attention: bool = True
    max_relative_position: int = 32  # learned relative bias buckets are clipped to +-this
    num_classes: int = 0  # 0: unconditional; otherwise index num_classes is the null label (CFG)
    frame_conditioning: bool = True  # extra inputs: known frames' latents + a mask channel
    # width of the text encoder's token embeddings; 0: no text. > 0: cross-attention to the tokens
    # after each spatial attention, and the pooled text added to the timestep embedding
    text_dim: int = 0
    # standardise the pooled text before it is projected into the timestep embedding: minus the mean
    # and over the standard deviation per feature of the pooled captions seen in training (running
    # statistics kept as buffers, frozen in eval mode and saved with the weights). A frozen encoder's
    # pooled embeddings share one large common direction; what tells captions apart is small beside it
    text_pool_norm: bool = False
    # spatial super-resolution stage (cascade): channels of the low-resolution latents given with
    # every input, upsampled to the input's grid and concatenated to it, plus the level of the
    # noise augmentation applied to them (an input of the model, embedded like the timestep). 0: none
    low_res_channels: int = 0
    # self-conditioning (Chen et al. 2022, "Analog Bits"): the model is also given its own previous
    # estimate of x0 (zeros when there is none), concatenated to its input. Training feeds a detached
    # estimate from a first forward pass on half the batches; samplers feed the previous step's
    self_condition: bool = False
    # after each temporal attention, a second one from every position to one attention-pooled
    # summary per frame of its clip (layers.ClipContextAttention): pixel to whole frame in one hop
    clip_context: bool = False
    gradient_checkpointing: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_levels"] = list(self.attention_levels)
        if not self.text_dim:
            del d["text_dim"]  # a model without text: config.json as before the key existed
        if not self.text_pool_norm:
            del d["text_pool_norm"]  # as before the key existed
        if not self.self_condition:
            del d["self_condition"]  # as before the key existed
        if not self.clip_context:
            del d["clip_context"]  # as before the key existed
        if not self.low_res_channels:
            del d["low_res_channels"]  # not a super-resolution stage: as before the key existed
        if self.joint_attention_levels:
            d["joint_attention_levels"] = list(self.joint_attention_levels)
        else:
            del d["joint_attention_levels"]  # factorized: config.json as before the key existed
        if self.temporal_attention_levels is None:
            del d["temporal_attention_levels"]  # as before the key existed: old checkpoints still match
        else:
            d["temporal_attention_levels"] = list(self.temporal_attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> UNetConfig:
        return _strict_from_dict(cls, d, source)


@dataclass
class DiffusionConfig:
    """Noise schedule, prediction target and loss weighting (diffusion/schedules.py, process.py)."""

    schedule: str = "cosine"  # "linear" or "cosine"
    num_timesteps: int = 1000
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02
    zero_terminal_snr: bool = False  # Lin et al. 2023 rescaling (use with v-prediction)
    # > 1: every step noisier, SNR / shift^2 (schedules.make_alphas_cumprod); small latent grids
    # need more noise for the same corruption of their content
    schedule_shift: float = 1.0
    prediction: str = "v"  # "eps", "v" or "x0"
    loss_weighting: str = "min_snr"  # "none" or "min_snr"
    min_snr_gamma: float = 5.0
    # correlation of the noise between the frames of a clip (mixed-noise prior, Ge et al. 2023);
    # 0 = independent noise per frame. Training and sampling use the same value (it is exported).
    frame_noise_correlation: float = 0.0
    # how training draws each batch's timesteps: "uniform" (i.i.d.) or "stratified" (one draw from each
    # of B equal slices of the schedule, shuffled: the same distribution, less variance in each batch's
    # loss; Kingma et al. 2021's low-discrepancy sampler). Training only; sampling ignores it.
    timestep_sampling: str = "uniform"
    # > 0: the loss adds this weight times the squared error of the prediction's frame-to-frame
    # differences (process.training_losses): the same optimum (any positive-definite weighting of the
    # error has the conditional mean as its minimiser), but errors that differ from frame to frame (a
    # path's jitter) cost more while the model learns. Clips only; training only.
    temporal_loss_weight: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for key, default in (("timestep_sampling", "uniform"), ("temporal_loss_weight", 0.0)):
            if d[key] == default:
                del d[key]  # as before the key existed: older exports and checkpoints still match
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> DiffusionConfig:
        return _strict_from_dict(cls, d, source)


def _strict_from_dict(cls, d: dict, source: str):
    """Build a flat dataclass from a dict, naming any unknown key (used for config.json)."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) for {cls.__name__}: {', '.join(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kwargs)
