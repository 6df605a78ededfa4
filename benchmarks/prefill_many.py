"""Prefill of several prompts of different lengths (a server admitting new requests): packed in one forward vs one
prompt at a time, rwkvkit and the official `rwkv` package side by side in one run.

    python benchmarks/prefill_many.py                         # random RWKV-7 0.1B shape, 8 prompts of 16-256 tokens
    python benchmarks/prefill_many.py --device cuda --dtype fp16 --prompts 32 --max-len 1024

An RNN cannot batch prompts of different lengths by padding (pad tokens would run through the state), so without
packing each prompt is its own call. rwkvkit's `Decoder.prefill([p0, p1, ...])` runs them as packed sequences
(`cu_seqlens`): one forward over all their tokens, each prompt's state and last logits exactly its own. The official
package takes one sequence per call. Reported: total prompt tokens per second (best of `--repeats`), and the largest
|logit difference| between our packed and one-at-a-time results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Runs in the official package's process (it reads its environment at import): the prompts one call each.
OFFICIAL = r"""
import json, os, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from rwkv.model import RWKV
prompts, repeats = json.loads(sys.argv[3]), int(sys.argv[4])
model = RWKV(model=sys.argv[1], strategy=sys.argv[5])
model.forward(prompts[0][:16], None)  # TorchScript compiles on the first calls
best = float("inf")
for _ in range(repeats):
    t = time.perf_counter()
    for p in prompts:
        model.forward(p, None)
    if "cuda" in sys.argv[5]:
        torch.cuda.synchronize()
    best = min(best, time.perf_counter() - t)
print(json.dumps({"seconds": best}))
"""


def prompt_lengths(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


def best_seconds(fn, repeats: int, device: str) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def measure_rwkvkit(path: Path, prompts: list[list[int]], device: str, dtype: str, repeats: int) -> dict:
    import rwkvkit
    from rwkvkit.runtime.decode import Decoder

    model = rwkvkit.load(path, device=device, dtype=dtype, tokenizer=None)
    # eager, no CUDA graphs: the same forward for both ways (graph pieces serve prompts of one length only)
    dec = Decoder(model, batch_size=len(prompts), cuda_graph=False, compile=False, fused=False)
    rows = list(range(len(prompts)))

    def packed():
        return dec.prefill(prompts, rows=rows)

    def one_at_a_time():
        return torch.cat([dec.prefill(p, rows=[i]) for i, p in enumerate(prompts)])

    diff = (packed().float() - one_at_a_time().float()).abs().max().item()
    return {"packed": best_seconds(packed, repeats, device),
            "one at a time": best_seconds(one_at_a_time, repeats, device), "max |logit diff|": diff}


def measure_official(path: Path, prompts, threads: int, strategy: str, repeats: int) -> float | None:
    env = dict(os.environ, RWKV_V7_ON="1", RWKV_JIT_ON="1")
    if "cuda" in strategy:
        env["RWKV_CUDA_ON"] = "1"
    model = str(path)[: -len(".pth")]
    args = [model, str(threads), json.dumps(prompts), str(repeats), strategy]
    proc = subprocess.run([sys.executable, "-c", OFFICIAL, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"official package failed:\n{proc.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="official RWKV-7 .pth (default: a random 0.1B-shaped model)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-official", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            sys.path.insert(0, str(Path(__file__).parent))
            from cpu_inference import random_v7_checkpoint

            path = Path(tmp) / "random-v7-0.1B.pth"
            random_v7_checkpoint(path, n_layer=12, n_embd=768, vocab=65536)
        lengths = prompt_lengths(args.prompts, args.min_len, args.max_len)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 65536, (n,), generator=g).tolist() for n in lengths]
        total = sum(lengths)
        ours = measure_rwkvkit(path, prompts, args.device, dtype, args.repeats)
        official = None
        if not args.no_official:
            official = measure_official(path, prompts, args.threads, f"{args.device} {args.dtype}", args.repeats)

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"# {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
          f"{args.dtype}; {args.prompts} prompts of {args.min_len}-{args.max_len} tokens ({total} in all)")
    print("| way | seconds | prompt tokens/s | vs official |")
    print("|---|---|---|---|")
    rows = [("rwkvkit packed (Decoder.prefill of the list)", ours["packed"]),
            ("rwkvkit one prompt per call", ours["one at a time"])]
    if official is not None:
        rows.append(("official `rwkv`, one prompt per call", official))
    for name, seconds in rows:
        ratio = f"{official / seconds:.2f}x" if official else "-"
        print(f"| {name} | {seconds:.3f} | {total / seconds:,.0f} | {ratio} |")
    print(f"max |logit difference| packed vs one at a time: {ours['max |logit diff|']:.2e}")


if __name__ == "__main__":
    main()
