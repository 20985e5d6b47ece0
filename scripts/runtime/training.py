"""Training-loop pieces shared by both training scripts: accelerate set-up, per-step seeding,
EMA, LR warm-up, the non-finite guard, and the metrics log."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from data.files import atomic_write, seed_from

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training cannot continue (for example too many non-finite steps in a row)."""


# ----------------------------------------------------------------------------- accelerate


def make_accelerator(train_cfg, output_dir: Path):
    """An Accelerator configured from `train.*`; works under plain python and `accelerate launch`."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    kwargs = {}
    if train_cfg.tensorboard:
        kwargs["log_with"] = "tensorboard"
    return Accelerator(
        mixed_precision=train_cfg.mixed_precision,
        gradient_accumulation_steps=train_cfg.grad_accum,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        **kwargs,
    )


def adamw(params, train_cfg, device, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) when train.fused_adamw says so; "auto" fuses on
    CUDA only, where it is the documented fast path (CPU results stay bit-identical to before)."""
    fused = train_cfg.fused_adamw == "on" or (train_cfg.fused_adamw == "auto" and torch.device(device).type == "cuda")
    return torch.optim.AdamW(params, lr=train_cfg.lr, fused=fused or None, **kwargs)


def fast_path(model: torch.nn.Module, train_cfg) -> torch.nn.Module:
    """channels-last weights and an in-place torch.compile of `model` (parameter names, and so
    checkpoints and exports, are unchanged). A graph that fails to compile runs eagerly with a
    warning instead of stopping the run (torch._dynamo's suppress_errors)."""
    if train_cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if train_cfg.compile:
        from torch._dynamo import config as dynamo_config

        dynamo_config.suppress_errors = True
        model.compile()
    return model


DEFAULT_CPU_THREADS = torch.get_num_threads()  # this process's intra-op threads (OMP_NUM_THREADS or the cores)


def limit_cpu_threads(num_workers: int, device) -> None:
    """Leave a core to each DataLoader worker: on CPU the main process's OpenMP threads otherwise
    spin against the workers (measured: encoding 20x slower with 2 workers on 2 cores). With no
    workers the default count is restored, so a job run after another in the same process (the
    demo trains stage 2 right after encoding with 2 workers) gets its cores back."""
    if torch.device(device).type != "cpu":
        return
    if num_workers > 0:
        torch.set_num_threads(max(1, min(DEFAULT_CPU_THREADS, (os.cpu_count() or 1) - num_workers)))
    else:
        torch.set_num_threads(DEFAULT_CPU_THREADS)


def step_seed(seed: int, step: int, rank: int, stream: str = "") -> int:
    """A 63-bit seed that is a pure function of (seed, step, rank, stream).

    Seeding every step this way makes a resumed run draw exactly the random numbers the
    uninterrupted run drew at the same step, whatever happened before."""
    return seed_from(seed, step, rank, stream)


def seed_init(seed: int) -> None:
    """Seed the global torch RNG before building models, so the initial weights (and any fixed
    random parts, such as an un-pretrained LPIPS backbone, which are not checkpointed) are a pure
    function of the seed: identical across runs, restarts and ranks."""
    torch.manual_seed(step_seed(seed, 0, 0, "init"))


def seed_step(seed: int, step: int, rank: int, device, micro: int = 0) -> torch.Generator:
    """Seed the global torch RNG (dropout etc.) for this step and return a generator for the
    step's explicit draws (noise, timesteps, masks). `micro` is the micro-batch's index inside a
    gradient-accumulation window, so each micro-batch draws its own numbers."""
    tag = "" if micro == 0 else f"-{micro}"  # micro-batch 0 keeps the streams of grad_accum=1
    torch.manual_seed(step_seed(seed, step, rank, "global" + tag))
    g = torch.Generator(device=device)
    g.manual_seed(step_seed(seed, step, rank, "draws" + tag))
    return g


# ----------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's parameters and buffers, kept in float32.

    decay_t = min(decay, (1 + t) / (10 + t)) warms the average up so early weights do not
    dominate it for ~1/(1-decay) steps (as in many diffusion codebases)."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        t = self.num_updates
        d = min(self.decay, (1 + t) / (10 + t))
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        # checkpoints load on the CPU: keep each average on its model's device (CUDA after a resume),
        # sharded like the model's parameters under train.fsdp
        from scripts.runtime.sharding import like

        self.shadow = {k: like(v.to(torch.float32), self.shadow[k]).to(self.shadow[k].device).clone()
                       for k, v in state.items()}
        self.num_updates = num_updates

    def full_state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The averages as full CPU tensors (a collective under train.fsdp: every process calls it;
        keep=False gathers without keeping them, for the processes that do not use them)."""
        from scripts.runtime.sharding import full_tensors

        return full_tensors(self.shadow, keep=keep)

    def copy_to(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Load the averages (or `state`, such as `full_state_dict()`) into `model`, in its dtypes."""
        state = self.shadow if state is None else state
        sd = model.state_dict()
        model.load_state_dict({k: state[k].to(sd[k].dtype) for k in sd})
        return model

    def averaged_model(self, model: nn.Module) -> nn.Module:
        """An eager copy of `model` with the averaged weights (train.compile's in-place compilation
        is for training steps; sampling and export run the plain module)."""
        averaged = copy.deepcopy(model)
        if getattr(averaged, "_compiled_call_impl", None) is not None:
            averaged._compiled_call_impl = None
        return self.copy_to(averaged).eval()


# ----------------------------------------------------------------------------- schedule, guard


def warmup_lambda(warmup_steps: int, decay: str = "constant", max_steps: int = 0, min_ratio: float = 0.0):
    """LR multiplier of optimizer step `step`: linear warm-up over `warmup_steps`, then constant, or
    a cosine / linear decay from 1 to `min_ratio` at `max_steps` (a pure function of the step, so
    a resumed run follows the same schedule)."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step + 1 < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant" or max_steps <= warmup_steps:
            return 1.0
        frac = min(1.0, max(0.0, (step + 1 - warmup_steps) / (max_steps - warmup_steps)))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if decay == "cosine" else 1.0 - frac
        return min_ratio + (1.0 - min_ratio) * shape

    return f


def lr_lambda(tc):
    """`warmup_lambda` for a TrainConfig."""
    return warmup_lambda(tc.warmup_steps, tc.lr_decay, tc.max_steps, tc.lr_min_ratio)


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss or gradient norm; stops after
    `max_in_row` in a row. The gradient norm is computed after the all-reduce, so every
    process takes the same decision."""

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0

    def check(self, value: float, step: int) -> bool:
        if math.isfinite(value):
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        log.warning("step %d: non-finite loss/gradient (%s), update skipped (%d in a row)", step, value, self.in_row)
        if self.in_row >= self.max_in_row:
            raise TrainingStopped(
                f"stopping: {self.in_row} non-finite losses/gradients in a row (last at step {step}). "
                "The last complete checkpoint is intact; lower train.lr, raise train.grad_clip "
                "strictness, or try train.mixed_precision=no, then rerun to resume."
            )
        return False

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, d: dict) -> None:
        self.in_row, self.total = int(d["in_row"]), int(d["total"])


def grad_norms(acc, parameter_groups, max_norm: float) -> list[float]:
    """Clip each group's gradients to `max_norm` and return their norms (after DDP's all-reduce,
    so every process sees the same numbers). fp16 gradients are unscaled once, for every optimizer:
    accelerate's clip_grad_norm_ unscales all optimizers on each call, so a second call raises."""
    from scripts.runtime.sharding import scalar

    acc.unscale_gradients()
    return [scalar(torch.nn.utils.clip_grad_norm_(list(ps), max_norm)) for ps in parameter_groups]


def finish_step(acc, ok: bool, optimizer, scheduler) -> None:
    """Step on a finite gradient, skip otherwise. Under fp16 a skipped step still updates the
    GradScaler (it saw the inf/NaN while unscaling: the scale is lowered, and the next unscale does
    not fail with "unscale_() has already been called")."""
    if ok:
        optimizer.step()
        scheduler.step()
    elif acc.scaler is not None:
        acc.scaler.update()
    optimizer.zero_grad(set_to_none=True)


def injected_nonfinite(step: int) -> bool:
    """Fault injection for the reliability tests: LVD_FAULT_NAN_STEPS="3,4" poisons those steps
    (1-based, the step numbers of metrics.jsonl)."""
    return _fault_steps("LVD_FAULT_NAN_STEPS", step)


def inject_inf_gradient(model: nn.Module, step: int) -> None:
    """Fault injection: LVD_FAULT_INF_GRAD_STEPS="5" sets one gradient entry to +inf after the
    backward pass of those steps, while the loss stays finite."""
    if _fault_steps("LVD_FAULT_INF_GRAD_STEPS", step):
        p = next(p for p in model.parameters() if p.grad is not None)
        p.grad.view(-1)[0] = float("inf")


def _fault_steps(env: str, step: int) -> bool:
    spec = os.environ.get(env, "")
    return str(step) in {s.strip() for s in spec.split(",") if s.strip()}


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
    """One JSON object per logged step in DIR/metrics.jsonl (main process only). On resume the
    lines after the checkpoint's step are dropped, so every step appears exactly once."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= step:
                keep.append(line)
        with atomic_write(self.path) as tmp:
            tmp.write_text("".join(k + "\n" for k in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- debug hooks


class DebugLogs:
    """Debug hooks for the multi-process tests, off unless set in the environment: with
    LVD_DEBUG_PARAM_HASH=1 every rank appends {step, sha256 of its parameters} after each optimizer
    step to DIR/param-hash-rank{R}.jsonl; with LVD_DEBUG_SAMPLE_KEYS=1 the keys of every video
    batch it trains on to DIR/sample-keys-rank{R}.jsonl. The loop drops lines after a resumed step."""

    def __init__(self, out: Path, rank: int):
        on = {env: os.environ.get(env, "") not in ("", "0") for env in ("LVD_DEBUG_PARAM_HASH", "LVD_DEBUG_SAMPLE_KEYS")}
        self.hashes = MetricsLog(out / f"param-hash-rank{rank}.jsonl", enabled=on["LVD_DEBUG_PARAM_HASH"])
        self.keys = MetricsLog(out / f"sample-keys-rank{rank}.jsonl", enabled=on["LVD_DEBUG_SAMPLE_KEYS"])


def param_hash(model) -> str:
    """sha256 of every parameter in order; sharded parameters (train.fsdp) are gathered first, so
    every process hashes the same full weights (a collective then: all processes call it)."""
    h = hashlib.sha256()
    for p in model.parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()
