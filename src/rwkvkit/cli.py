"""`rwkvkit VERB ...`: a table of verbs, each imported only when it runs so `rwkvkit --help` stays instant.

Each verb module exposes `main(argv: list[str]) -> int | None` and builds its own parser (jsonargparse, from a
typed dataclass or function signature), so `rwkvkit VERB --help` documents exactly that verb.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

# verb -> (module, one-line description)
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("rwkvkit.demo", "the embedded default: prepare a corpus, train a tiny RWKV-7 on CPU, plot, generate"),
    "info": ("rwkvkit.convert", "print a checkpoint's version, layers, width, heads, vocab, parameters, dtype"),
    "convert": ("rwkvkit.convert", "convert between official .pth and HF-style safetensors folders (and dtypes)"),
    "generate": ("rwkvkit.generate", "stream text from a model given a prompt"),
    "prepare": ("rwkvkit.data.prepare", "tokenize jsonl/text into RWKV-LM compatible binidx files"),
    "pretrain": ("rwkvkit.train.pretrain", "train an RWKV model from scratch (CPU, one GPU, or torchrun)"),
    "estimate": ("rwkvkit.train.estimate", "estimate training FLOPs, GPU-hours and memory"),
    "plot": ("rwkvkit.train.plot", "plot a run's loss curve to PNG"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for verb, (module, desc) in VERBS.items():
        try:
            if importlib.util.find_spec(module) is not None:
                out[verb] = (module, desc)
        except ModuleNotFoundError:
            pass
    return out


def _usage(verbs: dict[str, tuple[str, str]]) -> str:
    width = max(len(v) for v in verbs) if verbs else 0
    lines = ["usage: rwkvkit VERB [options]   (rwkvkit VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {desc}" for verb, (_, desc) in verbs.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbs = _available()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(verbs))
        return 0
    if argv[0] in ("-V", "--version"):
        from rwkvkit import __version__

        print(__version__)
        return 0
    verb = argv[0]
    if verb not in verbs:
        print(f"rwkvkit: unknown verb {verb!r}\n\n{_usage(verbs)}", file=sys.stderr)
        return 2
    module = importlib.import_module(verbs[verb][0])
    entry = getattr(module, f"{verb}_main", None) or module.main
    from rwkvkit.errors import RwkvkitError

    try:
        return int(entry(argv[1:]) or 0)
    except RwkvkitError as e:
        print(f"rwkvkit {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rwkvkit {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
