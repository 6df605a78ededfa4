"""`rwkvkit info PATH` and `rwkvkit convert SRC DST [--dtype ...]`.

Both accept an official BlinkDL `.pth`, a `.safetensors` file or an rwkvkit HF-style folder. `convert` writes an
official `.pth` when DST ends with `.pth`, otherwise a folder (`config.json` + `model.safetensors`).
"""

from __future__ import annotations

from typing import Literal, Optional


def info(path: str) -> None:
    """Print a checkpoint's version, dimensions, parameter count and dtype (one `key: value` per line).

    Args:
        path: an official .pth, a .safetensors file, or an rwkvkit checkpoint folder
    """
    from rwkvkit.models.checkpoint import checkpoint_info

    for key, value in checkpoint_info(path).items():
        print(f"{key}: {value}")


def convert(src: str, dst: str, dtype: Optional[Literal["fp32", "fp16", "bf16"]] = None) -> None:
    """Convert between an official .pth and an HF-style folder, optionally changing the dtype.

    Args:
        src: the checkpoint to read (.pth, .safetensors or rwkvkit folder)
        dst: where to write: a path ending in .pth gets the official file, anything else a folder
        dtype: cast the floating-point tensors (default: keep the stored dtypes)
    """
    from rwkvkit.models.checkpoint import read_checkpoint, save_checkpoint

    state_dict, config = read_checkpoint(src)
    out = save_checkpoint(state_dict, dst, config=config, dtype=dtype)
    kind = "official .pth" if str(dst).endswith(".pth") else "folder"
    print(f"wrote {out} ({kind}, RWKV-{config.version}, L{config.n_layer} D{config.n_embd}, {dtype or 'stored dtype'})")


def _parser(func, prog: str, description: str):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description)
    parser.add_function_arguments(func, as_positional=True)
    return parser


def info_main(argv: list[str]) -> int:
    args = _parser(info, "rwkvkit info", info.__doc__.splitlines()[0]).parse_args(argv)
    info(args.path)
    return 0


def main(argv: list[str]) -> int:
    args = _parser(convert, "rwkvkit convert", convert.__doc__.splitlines()[0]).parse_args(argv)
    convert(args.src, args.dst, args.dtype)
    return 0
