"""CPU inference speed: rwkvkit vs the official `rwkv` package, side by side in one run.

    python benchmarks/cpu_inference.py                # random RWKV-7 0.1B shape (L12 D768 V65536), fp32
    python benchmarks/cpu_inference.py --model PATH   # any official .pth (the official side needs RWKV_V7_ON for v7)
    python benchmarks/cpu_inference.py --dtypes fp32 bf16   # also bf16 weights (the state stays fp32)

Measures prefill tokens/s (one 512-token call, from an empty state) and decode tokens/s (one-token calls carrying the
state), each the best of `--repeats` runs, for rwkvkit's native API (`model(ids, state)`), for its compat layer
(`RWKV.forward(list, state)`, what a ChatRWKV script calls) and for the official package (`RWKV(strategy="cpu fp32")`
or `"cpu bf16"`, JIT on as by default; run in a subprocess because it reads its environment at import). For bf16 it
reports the largest |logit difference| from fp32 weights (last prefill position and after the decode steps). It also
measures the memory bandwidth, since decoding one token reads every weight matrix once: bytes per token / bandwidth
bounds the decode speed.
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

# Runs in the official package's process: the same measurements through its API.
OFFICIAL = r"""
import json, os, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from rwkv.model import RWKV
prefill, decode, repeats = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = RWKV(model=sys.argv[1], strategy="cpu " + sys.argv[6])
ids = torch.randint(0, model.args.vocab_size, (prefill,), generator=torch.Generator().manual_seed(0)).tolist()
model.forward(ids[:16], None)  # TorchScript compiles on the first calls
best_prefill = best_decode = 0.0
for _ in range(repeats):
    t = time.perf_counter()
    out, state = model.forward(ids, None)
    best_prefill = max(best_prefill, prefill / (time.perf_counter() - t))
    for tok in ids[:2]:
        out, state = model.forward([tok], state)
    t = time.perf_counter()
    for tok in ids[:decode]:
        out, state = model.forward([tok], state)
    best_decode = max(best_decode, decode / (time.perf_counter() - t))
print(json.dumps({"prefill": best_prefill, "decode": best_decode}))
"""


def random_v7_checkpoint(path: Path, n_layer: int, n_embd: int, vocab: int) -> None:
    """An RWKV-7 with random weights in the official layout (speed does not depend on the values)."""
    from rwkvkit.models import RWKVConfig, build_model
    from rwkvkit.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(RWKVConfig(version="7", n_layer=n_layer, n_embd=n_embd, vocab_size=vocab))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "r_k" not in name:
                p.normal_(0, p.shape[-1] ** -0.5 if "emb" not in name else 1.0)
            elif "ln" not in name:
                p.uniform_(0, 1)
    save_checkpoint(model, path)


def memory_bandwidth(threads: int) -> dict:
    """GB/s of a streaming read (sum of 1 GiB) and of fp32 matrix-vector products as large as a World head,
    with the matrix stored [out, in] (nn.Linear, rwkvkit) and [in, out] (how the official package stores it)."""
    torch.set_num_threads(threads)
    big = torch.ones(256 * 2**20)
    mat = torch.randn(65536, 768)
    mat_t = mat.t().contiguous()
    vec = torch.randn(1, 768)
    runs = {
        "read": (big.sum, big.numel()),
        "gemv [out,in]": (lambda: torch.nn.functional.linear(vec, mat), mat.numel()),
        "gemv [in,out]": (lambda: vec @ mat_t, mat.numel()),
    }
    return {name: 4 * n / 1e9 * best_rate(fn, 1, 5) for name, (fn, n) in runs.items()}


def decode_bytes_per_token(model) -> int:
    """Bytes of weights that one decode step reads: everything but the embedding (of which it reads one row)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "emb.weight")


def best_rate(fn, tokens: int, repeats: int) -> float:
    """Tokens per second of the fastest of `repeats` calls of fn()."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return tokens / best


@torch.no_grad()
def measure_rwkvkit(path: Path, dtype: str, prefill: int, decode: int, repeats: int) -> dict:
    """tokens/s of three ways to run rwkvkit: {way: (prefill, decode)}, and the runtime's logits (for accuracy)."""
    import rwkvkit
    from rwkvkit.compat import RWKV
    from rwkvkit.runtime.generation import DecodeStep, last_logits, use_gemv_friendly_layout

    model = rwkvkit.load(path, dtype=dtype.removesuffix("i8"), tokenizer=None)
    if dtype.endswith("i8"):  # weight-only int8 matrices (rwkvkit.runtime.quant), strategy "cpu bf16i8"
        from rwkvkit.runtime.quant import quantize_int8

        quantize_int8(model)
    ids = torch.randint(0, model.config.vocab_size, (1, prefill), generator=torch.Generator().manual_seed(0))
    tokens = ids[0].tolist()
    _, state = model(ids[:, :16])
    results = {}

    def run_steps(step):
        s = state
        for i in range(decode):
            logits, s = step(ids[:, i : i + 1], s)
        return logits

    # the model as called directly: every position's logits, Python-level op dispatch
    results["rwkvkit model() eager"] = (
        best_rate(lambda: model(ids), prefill, repeats),
        best_rate(lambda: run_steps(model), decode, repeats),
    )
    # what `rwkvkit generate` does: weights in the GEMV-friendly layout, last-position logits for the prefill,
    # traced one-token steps
    use_gemv_friendly_layout(model)
    step = DecodeStep(model)
    for i in range(2):  # records the trace (the official side gets the same two warm-up steps)
        step(ids[:, i : i + 1], state)
    results["rwkvkit runtime"] = (
        best_rate(lambda: last_logits(model, ids), prefill, repeats),
        best_rate(lambda: run_steps(step), decode, repeats),
    )
    logits = torch.stack((last_logits(model, ids)[0][0], run_steps(step)[0])).float()
    # the compat layer, called exactly as a ChatRWKV script calls the official package
    compat = RWKV(model=str(path), strategy=f"cpu {dtype}", verbose=False)
    _, flat = compat.forward(tokens[:16], None)
    for tok in tokens[:2]:
        _, flat = compat.forward([tok], flat)

    def compat_steps():
        f = list(flat)
        for tok in tokens[:decode]:
            _, f = compat.forward([tok], f)

    results["rwkvkit compat"] = (
        best_rate(lambda: compat.forward(tokens, None), prefill, repeats),
        best_rate(compat_steps, decode, repeats),
    )
    return {
        "results": results,
        "logits": logits,
        "bytes_per_token": decode_bytes_per_token(model),
        "version": model.config.version,
    }


@torch.no_grad()
def profile_rwkvkit(path: Path, prefill: int, rows: int = 12) -> None:
    """Print where the time of one prefill and of 8 decode steps goes, per aten op (self time)."""
    import rwkvkit
    from rwkvkit.runtime.generation import DecodeStep, last_logits, use_gemv_friendly_layout

    model = rwkvkit.load(path, dtype="fp32", tokenizer=None)
    use_gemv_friendly_layout(model)
    ids = torch.randint(0, model.config.vocab_size, (1, prefill), generator=torch.Generator().manual_seed(0))
    step = DecodeStep(model)
    _, state = last_logits(model, ids[:, :16])
    step(ids[:, :1], state)
    with torch.profiler.profile() as prof:
        last_logits(model, ids)
    print(f"\nprofile: prefill of {prefill} tokens (rwkvkit runtime)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    for name, fn in (("eager model()", model), ("traced DecodeStep", step)):
        with torch.profiler.profile() as prof:
            s = state
            for i in range(8):
                _, s = fn(ids[:, i : i + 1], s)
        print(f"profile: 8 decode steps, {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _best(a: tuple, b: tuple) -> tuple:
    return tuple(max(x, y) for x, y in zip(a, b))


def measure_official(
    path: Path, dtype: str, version: str, threads: int, prefill: int, decode: int, repeats: int
) -> dict | None:
    env = dict(os.environ)
    if version == "7":
        env["RWKV_V7_ON"] = "1"
    model = str(path)[: -len(".pth")] if str(path).endswith(".pth") else str(path)
    args = [model, str(threads), str(prefill), str(decode), str(repeats), dtype]
    proc = subprocess.run([sys.executable, "-c", OFFICIAL, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"official package failed ({dtype}):\n{proc.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="official .pth (default: a random RWKV-7 0.1B-shaped model)")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32, help="tokens per decode measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternate ours/official this many times")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16", "bf16i8"], default=["fp32"],
                        help="weight dtypes (bf16i8: int8 matrices, bf16 elsewhere)")
    parser.add_argument("--no-official", action="store_true", help="skip the official package")
    parser.add_argument("--profile", action="store_true", help="also print per-op profiles of rwkvkit's runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = Path(tmp) / "rwkv7-0.1b-random.pth"
            random_v7_checkpoint(path, n_layer=12, n_embd=768, vocab=65536)
        bandwidth = memory_bandwidth(args.threads)
        if args.profile:
            profile_rwkvkit(path, args.prefill)
        # Alternate the implementations over rounds and keep each one's best: a busy machine then slows a
        # round, not one side of the comparison.
        ours: dict = {}
        official: dict = {}
        for _ in range(args.rounds):
            for dtype in args.dtypes:
                run = measure_rwkvkit(path, dtype, args.prefill, args.decode, args.repeats)
                if dtype in ours:
                    run["results"] = {k: _best(v, ours[dtype]["results"][k]) for k, v in run["results"].items()}
                ours[dtype] = run
                if not args.no_official and not dtype.endswith("i8"):
                    version = run["version"]
                    run = measure_official(path, dtype, version, args.threads, args.prefill, args.decode, args.repeats)
                    if run is not None:
                        old = official.get(dtype)
                        official[dtype] = run if old is None else {k: max(v, old[k]) for k, v in run.items()}

    first = ours[args.dtypes[0]]
    print(f"\nRWKV-{first['version']} {path.name}, {args.threads} threads, torch {torch.__version__}")
    print(
        f"prefill: one call of {args.prefill} tokens; decode: {args.decode} one-token calls; "
        f"best of {args.repeats} x {args.rounds} rounds; ratios against the official package in fp32"
    )
    base = official.get("fp32")
    rows = {}
    for dtype in args.dtypes:
        if dtype in official:
            rows[f"official rwkv 0.8.32 {dtype}"] = (official[dtype]["prefill"], official[dtype]["decode"])
        rows.update({f"{name} {dtype}": rate for name, rate in ours[dtype]["results"].items()})
    print(f"\n| {'implementation':<31} | {'prefill tok/s':>15} | {'decode tok/s':>14} |")
    print(f"|{'-' * 33}|{'-' * 17}|{'-' * 16}|")
    for name, (pre, dec) in rows.items():
        pre_s = f"{pre:.1f}" + (f" ({pre / base['prefill']:.2f}x)" if base else "")
        dec_s = f"{dec:.1f}" + (f" ({dec / base['decode']:.2f}x)" if base else "")
        print(f"| {name:<31} | {pre_s:>15} | {dec_s:>14} |")
    if "fp32" in ours:
        for dtype in args.dtypes:
            if dtype != "fp32":
                diff = (ours[dtype]["logits"] - ours["fp32"]["logits"]).abs().max().item()
                scale = ours["fp32"]["logits"].abs().max().item()
                print(f"\n{dtype} weights: max |logit diff| vs fp32 {diff:.4f} (largest |logit| {scale:.2f})")
    for dtype in args.dtypes:
        gb = ours[dtype]["bytes_per_token"] / 1e9
        print(f"\n{dtype}: decode reads {gb * 1e3:.0f} MB of weights per token; fp32 bandwidth and the speed allowed:")
        for name, rate in bandwidth.items():
            print(f"  {name:<14} {rate:6.1f} GB/s -> at most {rate / gb:5.1f} tok/s")


if __name__ == "__main__":
    main()
