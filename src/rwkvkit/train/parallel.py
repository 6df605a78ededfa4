"""Everything applied to a single-device model from the outside: process groups (torchrun), DDP / FSDP2 wrapping,
per-block activation checkpointing and dropout. The model code never knows about any of it."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from rwkvkit.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--train.device cuda: no CUDA device is available")
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def teardown(finished: bool = True) -> None:
    """Leave the process group. After a finished run every rank first waits at a barrier, so that none destroys
    the group while another still uses it (a gloo rank was seen to abort with "terminate called without an active
    exception" at that point). After an error the group is left to the process's exit: a barrier or a destroy could
    wait forever for a rank that failed somewhere else."""
    if dist.is_initialized() and finished:
        dist.barrier()
        dist.destroy_process_group()


def all_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= info.world_size
    return x


def freeze_unused(model: nn.Module) -> list[str]:
    """Freeze the parameters that never get a gradient (v7's layer-0 v0/v1/v2 exist for the official layout only):
    DDP would wait for their gradients forever. Found by one tiny forward/backward on the model as it is."""
    for p in model.parameters():
        p.grad = None
    hidden, _ = model.hidden(torch.zeros(1, 2, dtype=torch.long, device=model.emb.weight.device))
    probe = hidden.sum() + model.head.weight.sum()
    if not probe.requires_grad:  # everything frozen (e.g. only an initial state is trained elsewhere)
        return []
    probe.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in model.named_parameters():
        p.grad = None
        if n in unused:
            p.requires_grad_(False)
    return unused


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations during backward instead of storing them (names stay unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def add_dropout(model: nn.Module, p: float) -> None:
    """Dropout on the embedding output and on the residual stream after every block.

    RWKV-LM (v5 path) drops after each of the two residual adds of a block; from outside the block we can only
    reach its output, so this applies one dropout per block.
    """
    if p <= 0:
        return
    drop = nn.Dropout(p)

    def on_block(module, args, out):
        return (drop(out[0]), *out[1:]) if module.training else out

    def on_emb(module, args, out):
        return drop(out) if module.training else out

    model.emb.register_forward_hook(on_emb)
    for block in model.blocks:
        block.register_forward_hook(on_block)


def wrap(module: nn.Module, model: nn.Module, mode: str, info: DistInfo) -> nn.Module:
    """DDP or FSDP2 around `module` (the loss wrapper holding `model`); returns the module to call."""
    if not info.distributed:
        return module
    if mode in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if mode == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        for block in model.blocks:
            if hasattr(block, "ln0"):  # block 0's ln0 runs before the block itself, so it needs its own unshard
                fully_shard(block.ln0)
            fully_shard(block)
        fully_shard(module)
        return module
    raise ConfigError(f"unknown parallel mode {mode!r} (auto, ddp, fsdp)")


def is_fsdp(module: nn.Module) -> bool:
    return type(module).__name__.startswith("FSDP")
