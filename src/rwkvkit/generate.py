"""`rwkvkit generate`: stream text from a checkpoint, given a prompt."""

from __future__ import annotations

import os
import sys

# The World and NeoX vocabularies both use id 0 as end-of-text.
END_OF_TEXT = 0
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """Turn the two characters `\\n` typed in a shell into a newline (also `\\t`, `\\r`, `\\\\`); other text is kept."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def generate(
    model: str,
    prompt: str = "\n",
    max_tokens: int = 200,
    temperature: float = 1.0,
    top_p: float = 0.85,
    top_k: int = 0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    penalty_decay: float = 0.996,
    seed: int | None = None,
    stop: list[str] | str | None = None,
    stop_at_eos: bool = True,
    device: str = "cpu",
    dtype: str | None = None,
    int8: bool = False,
    tokenizer: str = "auto",
) -> None:
    """Stream text from a model given a prompt (sampling as in the official rwkv package).

    Args:
        model: checkpoint: an official .pth file, a .safetensors file or an rwkvkit folder.
        prompt: the text to continue (the escapes \\n, \\t, \\r and \\\\ are understood).
        max_tokens: the most tokens to generate.
        temperature: 0 is greedy; applied after top-p/top-k truncation (the official rule).
        top_p: nucleus sampling threshold (1.0 keeps every token).
        top_k: keep only the k most likely tokens (0 = off).
        presence_penalty: subtracted from the logit of every token that was already generated.
        frequency_penalty: subtracted once per (decayed) earlier occurrence of a token.
        penalty_decay: every step, earlier occurrences count this much less.
        seed: random seed; the same seed, model and options give the same text.
        stop: a stop string, or a list like '["\\n\\n", "User:"]': generation ends before the first one found,
            which is not printed (escapes as in the prompt).
        stop_at_eos: end at the end-of-text token (id 0).
        device: cpu, cuda, cuda:1, ...
        dtype: fp32, bf16 or fp16 (default: the checkpoint's, fp32 for fp16 files on CPU).
        int8: store the matrices as int8 (weight-only, a scale per row): a quarter of fp32's memory, and faster
            decoding with bf16 on the CPU (`--dtype bf16 --int8 true`).
        tokenizer: world, neox, a tokenizer file, or auto (picked from the vocab size).
    """
    import rwkvkit
    from rwkvkit.errors import ConfigError
    from rwkvkit.runtime.generation import generate_tokens, use_gemv_friendly_layout
    from rwkvkit.runtime.sampling import SamplingParams

    sampling = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        penalty_decay=penalty_decay,
    )
    net = rwkvkit.load(model, device=device, dtype=dtype, tokenizer=tokenizer, int8=int8)
    use_gemv_friendly_layout(net)
    if net.tokenizer is None:
        raise ConfigError(
            f"no tokenizer for a vocabulary of {net.config.vocab_size}; pass --tokenizer world|neox|FILE"
        )
    if isinstance(stop, str):
        stop = [stop]
    prompt_ids = net.tokenizer.encode(unescape(prompt))
    if not prompt_ids:
        raise ConfigError("the prompt is empty; give at least one character")
    chunks = generate_tokens(
        net,
        prompt_ids,
        max_tokens=max_tokens,
        sampling=sampling,
        stop_tokens=[END_OF_TEXT] if stop_at_eos else [],
        stop_strings=[unescape(s) for s in stop or []],
        tokenizer=net.tokenizer,
        seed=seed,
    )
    for chunk in chunks:
        if chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _dashed_options(argv: list[str]) -> list[str]:
    """Accept `--max-tokens` as well as `--max_tokens` (jsonargparse names options after the parameters)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


def main(argv: list[str]) -> int:
    from jsonargparse import CLI

    try:
        CLI(generate, args=_dashed_options(argv), prog="rwkvkit generate", as_positional=False)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
