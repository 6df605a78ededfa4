"""Running models: `load` (checkpoint -> ready model), sampling and generation."""

from __future__ import annotations

__all__ = ["load"]


def load(path, device="cpu", dtype=None, tokenizer="auto"):
    """See `rwkvkit.runtime.loader.load` (imported lazily so the runtime package stays light)."""
    from rwkvkit.runtime.loader import load as _load

    return _load(path, device=device, dtype=dtype, tokenizer=tokenizer)
