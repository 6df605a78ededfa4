"""Tokenize-and-write throughput of `rwkvkit prepare` vs RWKV-LM's make_data.py approach, on the same input.

The input is real text that every machine has: the Python standard library's .py files, one jsonl record per file
(`--mb` of them). The baseline does what make_data.py does per record: json.loads, the official pure-Python
TRIE_TOKENIZER (from the `rwkv` package) in one process, the decode(encode(text)) == text check, token 0 appended,
uint16 written to .bin, then the .idx. The rwkvkit rows run the `rwkvkit prepare` command end to end (tokenizer
load, worker start-up, index, sidecar) with the default shuffle and `--repeat 1`.

Every run is a fresh process (so each side pays its start-up and tokenizer load once). The methods take turns,
run after run, so that a change in the machine's load touches them all alike. A row gives the median and the best
wall time of `--runs` runs, and the median CPU time (the process, its threads and its workers): on a shared
machine the CPU time is the steadier number. The speed-up compares medians.

    .venv/bin/python benchmarks/prepare.py [--mb 8] [--copies 1] [--workers 1 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np


def stdlib_jsonl(path: Path, max_bytes: int) -> int:
    """Write stdlib .py files (tests excluded) as {"text": ...} lines until max_bytes of jsonl; returns the size."""
    root = Path(sysconfig.get_paths()["stdlib"])
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        for py in sorted(root.rglob("*.py")):
            if "test" in py.parts or "site-packages" in py.parts:
                continue
            try:
                text = py.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text:
                continue
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            if size >= max_bytes:
                break
    return size


def make_data_baseline(src: str, out_prefix: str) -> None:
    """make_data.py's per-record work in one process with the official pure-Python trie."""
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkvkit.data.binidx import write_index

    tok = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    sizes = []
    with open(src, encoding="utf-8") as f, open(f"{out_prefix}.bin", "wb") as out:
        for line in f:
            if not line.strip():
                continue
            text = json.loads(line)["text"]
            ids = tok.encode(text)
            assert tok.decode(ids) == text
            ids.append(0)
            out.write(np.array(ids, dtype=np.uint16).tobytes())
            sizes.append(len(ids))
    write_index(f"{out_prefix}.idx", np.uint16, np.array(sizes), np.arange(len(sizes) + 1))


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and all its descendants)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=8.0, help="MB of jsonl input")
    ap.add_argument("--copies", type=int, default=1,
                    help="concatenate the input this many times (more data than the stdlib has, for steady-state rates)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=3, help="runs per method (2 CPUs are noisy)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--baseline-only", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_only:
        make_data_baseline(*args.baseline_only)
        return

    from rwkvkit.data.binidx import BinIdxDataset

    engine = "native" if importlib.util.find_spec("pyrwkv_tokenizer") else "python"
    rwkvkit = [sys.executable, "-m", "rwkvkit", "prepare"]
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "stdlib.jsonl"
        mb = stdlib_jsonl(src, int(args.mb * 1e6)) / 1e6
        if args.copies > 1:
            text = src.read_bytes()
            src.write_bytes(text * args.copies)
            mb *= args.copies
        copies = f" x {args.copies} copies" if args.copies > 1 else ""
        print(f"input: {mb:.2f} MB of jsonl (Python {sys.version.split()[0]} stdlib .py files{copies}), "
              f"{os.cpu_count()} CPUs, World tokenizer engine: {engine}")
        methods = []
        if not args.skip_baseline:
            methods.append(("make_data.py approach (pure-Python trie, 1 process)", "baseline",
                            [sys.executable, __file__, "--baseline-only", str(src), f"{tmp}/baseline"]))
        for w in args.workers:
            name = "1 process (native encoder threads)" if w == 1 else f"{w} processes (this one + {w - 1} more)"
            methods.append((f"rwkvkit prepare, {name}", f"ours{w}",
                            rwkvkit + [str(src), "--out", f"{tmp}/ours{w}", "--workers", str(w), "--quiet"]))
        times: dict[str, list[tuple[float, float]]] = {out: [] for _, out, _ in methods}
        for _ in range(args.runs):
            for _, out, cmd in methods:
                times[out].append(timed(cmd))
        rows = []
        for name, out, _ in methods:
            walls, cpus = (sorted(t[k] for t in times[out]) for k in (0, 1))
            tokens = BinIdxDataset(f"{tmp}/{out}").tokens
            rows.append((name, float(np.median(walls)), walls[0], float(np.median(cpus)), len(tokens)))
            if out != "baseline" and not args.skip_baseline:
                base = BinIdxDataset(f"{tmp}/baseline").tokens
                # ours is shuffled: the same tokens in another document order
                assert np.array_equal(np.sort(base), np.sort(tokens)), "the tokens differ from the baseline's"

    print(f"load average before / after: {load0:.1f} / {os.getloadavg()[0]:.1f}")
    base_rate = mb / rows[0][1] if not args.skip_baseline else None
    print(f"\n{args.runs} runs each\n| method | median wall s | best wall s | median CPU s | MB/s (median) | tokens | "
          "speed-up |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, wall, best, cpu, n_tokens in rows:
        rate = mb / wall
        speedup = f"{rate / base_rate:.1f}x" if base_rate else "-"
        print(f"| {name} | {wall:.2f} | {best:.2f} | {cpu:.2f} | {rate:.2f} | {n_tokens:,} | {speedup} |")


if __name__ == "__main__":
    main()
