"""Fully sharded training (`train.fsdp`): torch's FSDP2 `fully_shard` applied to every U-Net block
and to the root, so each process holds 1/N of the parameters, gradients, optimizer state and EMA.

accelerate's FSDP plugin is not used: accelerate 1.15 ignores it on CPU (it wraps the model in DDP
there), and FSDP1 refuses CPU tensors, while FSDP2 runs on gloo as on NCCL. So the trainer shards
the model itself and prepares only the optimizer with accelerate; this module gathers the full
state for checkpoints and exports (collectives: every process calls them) and spreads a full state
back into the shards on resume. Checkpoints keep the DDP layout for the model and the EMA (full
tensors in safetensors, loadable without FSDP); the optimizer's state is keyed by parameter name
(torch.distributed.checkpoint's full state dict), and `trainer.json` records `"fsdp": true`.
"""

from __future__ import annotations

import torch
from torch import nn


def shard(model: nn.Module, block_type: type) -> nn.Module:
    """fully_shard every `block_type` submodule, then the root (in place); needs an initialised
    process group (`accelerate launch`)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("train.fsdp shards the model over processes: run under `accelerate launch` "
                         "(--num_processes 2 or more)")
    for module in list(model.modules()):
        if isinstance(module, block_type):
            fully_shard(module)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _is_dtensor(x) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def full_tensors(state: dict, keep: bool = True) -> dict[str, torch.Tensor]:
    """A state dict with every sharded tensor gathered (a collective when any is sharded: every
    process calls it), on the CPU. keep=False (the processes that do not write the checkpoint)
    gathers tensor by tensor and keeps nothing, so only the writer ever holds the full state."""
    out = {}
    for k, v in state.items():
        full = (v.full_tensor() if _is_dtensor(v) else v).detach().cpu()
        if keep:
            out[k] = full
    return out


def like(full: torch.Tensor, reference) -> torch.Tensor:
    """`full` laid out as `reference`: sharded the same way when it is a DTensor."""
    if _is_dtensor(reference):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(reference.device, reference.dtype), reference.device_mesh,
                                 reference.placements)
    return full


def scalar(x) -> float:
    """A (possibly sharded) 0-d tensor as a float: clip_grad_norm_ of DTensor gradients is a DTensor."""
    return float(x.full_tensor() if _is_dtensor(x) else x)


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's full state dict, keyed by parameter name (collective); with cpu_offload the
    full tensors land on global rank 0 only (the writer), the others get an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _inner(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _inner(optimizer), optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def load_model_state(model: nn.Module, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it

