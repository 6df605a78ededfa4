"""`rwkvkit.load`: a checkpoint path -> a model in eval mode with `.config` and `.tokenizer`."""

from __future__ import annotations

from pathlib import Path

import torch

from rwkvkit.errors import RwkvkitError
from rwkvkit.models.checkpoint import model_from_state_dict, parse_dtype, read_checkpoint


def _auto_tokenizer(checkpoint: Path, vocab_size: int):
    """The tokenizer the model was trained with (65536: World; 50277/50304: NeoX, preferring a
    20B_tokenizer.json beside the checkpoint), or None when unknown or unavailable: the model still runs on ids."""
    try:
        from rwkvkit.tokenizer import tokenizer_for_vocab
    except ImportError:
        return None
    beside = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "20B_tokenizer.json"
    try:
        return tokenizer_for_vocab(vocab_size, path=beside if beside.is_file() else None)
    except RwkvkitError:
        return None


def load(path, device="cpu", dtype=None, tokenizer="auto", int8: bool = False):
    """Load an official `.pth`, a `.safetensors` file or an rwkvkit folder, ready for inference.

    dtype: None keeps the stored dtype, except fp16 on CPU, which becomes fp32 (CPU fp16 matmuls are slow and
    lossy); else fp32/fp16/bf16 or a torch.dtype. tokenizer: "auto" (vocab 65536 -> World, 50277/50304 -> NeoX,
    else None), a tokenizer name or vocab path, a tokenizer object, or None. int8: weight-only int8 matrices
    (`rwkvkit.runtime.quant.quantize_int8`), for inference.
    Gradients are switched off (a decoding loop then builds no autograd graph through the state); to fine-tune,
    use `rwkvkit.models.checkpoint.load_checkpoint` or `model.train().requires_grad_(True)`.
    """
    sd, config = read_checkpoint(path)
    target = parse_dtype(dtype)
    if target is None:
        target = sd["emb.weight"].dtype
        if target == torch.float16 and torch.device(device).type == "cpu":
            target = torch.float32
    model = model_from_state_dict(sd, config, device=device, dtype=target)
    model.eval()
    model.requires_grad_(False)
    if int8:
        from rwkvkit.runtime.quant import quantize_int8

        quantize_int8(model)
    if tokenizer == "auto":
        model.tokenizer = _auto_tokenizer(Path(path), config.vocab_size)
    elif isinstance(tokenizer, str):
        from rwkvkit.tokenizer import get_tokenizer

        model.tokenizer = get_tokenizer(tokenizer)
    else:
        model.tokenizer = tokenizer
    return model
