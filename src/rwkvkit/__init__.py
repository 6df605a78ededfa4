"""rwkvkit: one toolkit for RWKV language models v4, v5 (Eagle), v6 (Finch) and v7 (Goose).

Heavy modules (torch, the models) are imported lazily so that `import rwkvkit` and `rwkvkit --help` are instant.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def load(path, device="cpu", dtype=None, tokenizer="auto", int8: bool = False):
    """Load a checkpoint (official BlinkDL `.pth` or an HF-style folder) as a ready-to-run model.

    `model.forward(tokens, state=None) -> (logits, state)`; `model.tokenizer` encodes/decodes text.
    """
    from rwkvkit.runtime.loader import load as _load

    return _load(path, device=device, dtype=dtype, tokenizer=tokenizer, int8=int8)
