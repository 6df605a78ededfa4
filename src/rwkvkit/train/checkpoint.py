"""Full training checkpoints (atomic, resumable) and weight exports (official .pth, safetensors).

A checkpoint is one `torch.save` file `OUT/checkpoints/step-00001234.pt` holding everything needed to continue
bit-for-bit: weights, optimizer state, step/token counters, data position, RNG states (per rank) and the config.
Every file is written to a temporary name, flushed to disk, then renamed over the final name, so a kill at any
moment leaves either the old or the new checkpoint complete, never a torn one.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from rwkvkit.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)\.pt$")


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through `write(fileobj)` to a temp file beside `path`, fsync, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp files from an interrupted save are ignored)."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(payload: dict, out_dir: str | Path, step: int, keep: int) -> Path:
    path = checkpoint_path(out_dir, step)
    atomic_write(path, lambda f: torch.save(payload, f))
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(payload, dict) or "model" not in payload or "step" not in payload:
        raise CheckpointError(f"{path} is not an rwkvkit training checkpoint")
    return payload


def find_resume(out_dir: str | Path, resume: str) -> dict | None:
    """`resume` = 'none', 'auto' (newest readable checkpoint in out_dir, else None) or a checkpoint path."""
    if resume == "none":
        return None
    if resume != "auto":
        if not Path(resume).is_file():
            raise CheckpointError(f"--resume {resume}: no such checkpoint file")
        return load_checkpoint(resume)
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:  # fall back to the previous one, as RWKV-LM does
            print(f"warning: {e}; trying an older checkpoint", file=sys.stderr)
    return None


def export_weights(state_dict: dict[str, torch.Tensor], folder: str | Path, name: str, model_config: dict,
                   dtype: torch.dtype = torch.bfloat16) -> tuple[Path, Path]:
    """Weights only, in RWKV-LM's training dtype (bf16): the official `name.pth` (loads in the `rwkv` package and
    RWKV-LM) and an HF-style `name/` folder (config.json + model.safetensors). Returns both paths."""
    from rwkvkit.models.checkpoint import save_folder, save_pth
    from rwkvkit.models.common import RWKVConfig

    folder = Path(folder)
    pth = save_pth(state_dict, folder / f"{name}.pth", dtype)
    hf = save_folder(state_dict, RWKVConfig.from_dict(model_config), folder / name, dtype)
    return pth, hf
