"""World tokenizer speed, side by side on one real corpus: the Python standard library's own .py files.

Compares the official `rwkv` package's TRIE_TOKENIZER, the Rust packages on PyPI that are installed
(`pyrwkv-tokenizer`, `rwkv-tokenizer`), and rwkvkit with its native and Python engines. Reports encode of the whole
corpus as one string and decode of its ids (MB/s, best of --repeats, run round-robin; rwkvkit cuts a long text
into pieces encoded on all cores, so it also appears with that off), batch encode of the corpus files with 2 workers
(the package's own parallel batch where it has one, else a 2-process pool), and whether every implementation
gives the official ids.

    python benchmarks/tokenizer.py [--mb 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "2")  # the Rust batch encoders: 2 workers, like the process pools


def load_corpus(max_mb: float) -> list[str]:
    """Standard-library sources (tests and site-packages left out), file by file, up to max_mb of UTF-8."""
    root = Path(json.__file__).resolve().parents[1]
    docs, size = [], 0
    for file in sorted(root.rglob("*.py")):
        parts = set(file.relative_to(root).parts)
        if parts & {"test", "tests", "site-packages", "idle_test"}:
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        size += len(text.encode("utf-8"))
        if size >= max_mb * 1e6:
            break
    return docs


def implementations() -> dict:
    """name -> zero-argument factory of an object with encode(str) and decode(ids); only what is installed."""
    impls = {}
    if importlib.util.find_spec("rwkv"):

        def official():
            from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

            spec = importlib.util.find_spec("rwkv")
            return TRIE_TOKENIZER(str(Path(spec.origin).parent / "rwkv_vocab_v20230424.txt"))

        impls["official rwkv TRIE_TOKENIZER (Python)"] = official
    for package in ("pyrwkv_tokenizer", "rwkv_tokenizer"):
        if importlib.util.find_spec(package):
            impls[f"{package.replace('_', '-')} {_version(package)} (Rust)"] = _rust_factory(package)

    def ours(engine):
        def make():
            from rwkvkit.tokenizer import WorldTokenizer

            tokenizer = WorldTokenizer(engine=engine)
            tokenizer.encode("build the lazy parts")  # the Python trie
            tokenizer.decode([1] * 4096)  # the table of long decodes
            return tokenizer

        return make

    impls["rwkvkit (native engine)"] = ours("native")
    impls["rwkvkit (native engine, one thread)"] = lambda: OneThread(ours("native")())
    impls["rwkvkit (python engine)"] = ours("python")
    return impls


class OneThread:
    """rwkvkit with long texts encoded on one thread, as the other implementations do (no encode_batch:
    the batch column then uses 2 processes, each encoding on one thread)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        saved = os.environ.get("RAYON_NUM_THREADS")
        os.environ["RAYON_NUM_THREADS"] = "1"  # rwkvkit reads it to decide on cutting a long text into pieces
        try:
            return self.tokenizer.encode(text)
        finally:
            os.environ["RAYON_NUM_THREADS"] = saved if saved is not None else "2"

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def _rust_factory(package: str):
    def make():
        module = __import__(package)
        return module.WorldTokenizer(str(Path(module.__file__).parent / "rwkv_vocab_v20230424.txt"))

    return make


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package.replace("_", "-"))


def seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best_seconds(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        took, result = seconds(fn)
        best = min(best, took)
    return best, result


def interleaved_best(jobs: dict, repeats: int) -> dict:
    """name -> (best wall seconds, best CPU seconds of this process, result), running the jobs round-robin so
    that other load on the machine hits all alike. CPU time is the contention-proof measure of one-thread work."""
    best = {name: (float("inf"), float("inf"), None) for name in jobs}
    for _ in range(repeats):
        for name, fn in jobs.items():
            cpu_start = time.process_time()
            took, result = seconds(fn)
            cpu = time.process_time() - cpu_start
            best[name] = (min(took, best[name][0]), min(cpu, best[name][1]), result)
    return best


# Process-pool workers (for implementations without a parallel batch encode of their own)
_worker = None


def _init_worker(name: str) -> None:
    global _worker
    _worker = implementations()[name]()


def _encode_in_worker(text: str) -> list[int]:
    return _worker.encode(text)


def batch_encode_seconds(name: str, tokenizer, docs: list[str], repeats: int) -> tuple[float, list, str]:
    # rwkvkit's Python engine encodes a batch on one core, so it gets the process pool like the other Python one
    if hasattr(tokenizer, "encode_batch") and getattr(tokenizer, "engine", "native") == "native":
        took, ids = best_seconds(lambda: tokenizer.encode_batch(docs), repeats)
        return took, ids, "own parallel batch"
    with multiprocessing.get_context("spawn").Pool(2, initializer=_init_worker, initargs=(name,)) as pool:
        pool.map(_encode_in_worker, ["warm up"] * 2)  # start-up and vocab loading are not counted
        took, ids = best_seconds(lambda: pool.map(_encode_in_worker, docs, chunksize=1), repeats)
    return took, ids, "2 processes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="corpus size in MB of UTF-8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    docs = load_corpus(args.mb)
    text = "".join(docs)
    mb = len(text.encode("utf-8")) / 1e6
    print(f"corpus: {len(docs)} stdlib files, {mb:.2f} MB; {os.cpu_count()} CPUs; Python {platform.python_version()}")

    loaded = {name: seconds(make) for name, make in implementations().items()}
    tokenizers = {name: tokenizer for name, (_, tokenizer) in loaded.items()}
    encoded = interleaved_best({n: (lambda t=t: t.encode(text)) for n, t in tokenizers.items()}, args.repeats)
    decoded = interleaved_best(
        {n: (lambda t=t, ids=encoded[n][2]: t.decode(ids)) for n, t in tokenizers.items()}, args.repeats
    )
    rows, reference = [], None
    for name, tokenizer in tokenizers.items():
        batch_s, batch_ids, how = batch_encode_seconds(name, tokenizer, docs, args.repeats)
        (enc_s, enc_cpu, ids), (dec_s, dec_cpu, text_back) = encoded[name], decoded[name]
        if reference is None:
            reference = (ids, batch_ids)  # the official tokenizer comes first
        exact = (ids, batch_ids) == reference and text_back == text
        rows.append(
            [
                name,
                f"{loaded[name][0]:.2f}",
                f"{mb / enc_s:.1f} ({mb / enc_cpu:.1f})",
                f"{mb / dec_s:.1f} ({mb / dec_cpu:.1f})",
                f"{mb / batch_s:.1f} ({how})",
                str(len(ids)),
                "yes" if exact else "NO",
            ]
        )

    print()
    header = [
        "implementation",
        "load s",
        "encode MB/s (MB per CPU-s)",
        "decode MB/s (MB per CPU-s)",
        "batch encode, 2 workers, MB/s",
        "tokens",
        "same ids as official, round-trip",
    ]
    for cells in [header, ["---"] * len(header), *rows]:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
