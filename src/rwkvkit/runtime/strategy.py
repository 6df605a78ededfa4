"""The official `rwkv` package's strategy strings, e.g. "cpu fp32", "cuda fp16", "cuda fp16i8 *10 -> cpu fp32".

Grammar (official): one or more stages joined by `->`; a stage is `DEVICE DTYPE[QUANT] [*N[+]]` with
DEVICE = cpu | cuda | cuda:K | mps | dml, DTYPE = fp32 | fp16 | bf16, QUANT = i8 | i4 | i3, `*N` the number of
layers placed on that stage and a trailing `+` streaming the remaining layers' weights from CPU memory.

rwkvkit runs a model on one device in one dtype, so a strategy is accepted only when it means exactly that,
optionally with `i8` (weight-only int8 matrices, `rwkvkit.runtime.quant`). Everything else is refused with a
ConfigError naming the part we do not support; nothing is silently ignored (the official package, for one, quietly
treats `i4`/`i3` as plain fp16).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rwkvkit.errors import ConfigError

_STAGE = re.compile(
    r"(?P<device>cpu|cuda(?::\d+)?|mps|dml) (?P<dtype>fp32|fp16|bf16)(?P<quant>i8|i4|i3)?"
    r"(?: \*(?P<layers>\d+)(?P<stream>\+)?)?"
)
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Stage:
    device: str
    dtype: str  # fp32 | fp16 | bf16
    quant: str | None = None
    layers: int | None = None
    stream: bool = False


@dataclass(frozen=True)
class Strategy:
    """What a supported strategy resolves to: one torch device and one dtype for the whole model, and whether its
    matrices are int8 ("i8") or not (None)."""

    device: str
    dtype: str  # fp32 | fp16 | bf16
    text: str
    quant: str | None = None

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, _DTYPES[self.dtype])


def parse_stages(text: str) -> list[Stage]:
    """Split a strategy string into its stages; ConfigError if it does not follow the official grammar."""
    parts = [p.strip() for p in text.strip().split("->")]
    stages = []
    for part in parts:
        m = _STAGE.fullmatch(part)
        if m is None:
            raise ConfigError(
                f"invalid strategy {text!r}: stage {part!r} is not 'DEVICE DTYPE[i8] [*N[+]]' "
                "(DEVICE cpu|cuda|cuda:K|mps, DTYPE fp32|fp16|bf16), e.g. 'cpu fp32' or 'cuda fp16'"
            )
        layers = m["layers"]
        stages.append(Stage(m["device"], m["dtype"], m["quant"], int(layers) if layers else None, bool(m["stream"])))
    return stages


def parse_strategy(text: str) -> Strategy:
    """Resolve a strategy string to one device + one dtype, refusing what rwkvkit does not support."""
    stages = parse_stages(text)
    for s in stages:
        if s.quant and s.quant != "i8":
            raise ConfigError(
                f"strategy {text!r}: {s.dtype}{s.quant} weight quantization is not supported; use {s.dtype}i8 or "
                f"plain {s.dtype}"
            )
        if s.stream:
            raise ConfigError(f"strategy {text!r}: streaming layers from CPU ('*{s.layers}+') is not supported")
        if s.device == "dml":
            raise ConfigError(f"strategy {text!r}: the DirectML device 'dml' is not supported")
    if len({(s.device, s.dtype, s.quant) for s in stages}) > 1:
        raise ConfigError(
            f"strategy {text!r}: splitting layers over several devices or dtypes is not supported; "
            "use a single stage such as 'cuda fp16'"
        )
    device, dtype, quant = stages[0].device, stages[0].dtype, stages[0].quant
    if device == "cpu" and dtype == "fp16":
        raise ConfigError(f"strategy {text!r}: fp16 is not supported on CPU; use 'cpu fp32' or 'cpu bf16'")
    _check_device_available(device, text)
    return Strategy(device=device, dtype=dtype, text=text, quant=quant)


def _check_device_available(device: str, text: str) -> None:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"strategy {text!r}: CUDA is not available on this machine; use 'cpu fp32'")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"strategy {text!r}: no device {device} (this machine has {torch.cuda.device_count()})")
    elif device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"strategy {text!r}: the Apple 'mps' device is not available on this machine")
