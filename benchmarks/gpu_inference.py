"""RWKV-7 inference on one GPU: our Decoder / forward vs the official `rwkv` package, against the bandwidth bound.

    python benchmarks/gpu_inference.py                       # 0.1B and 1.5B, official package included (~6 min)
    python benchmarks/gpu_inference.py --sizes 0.1B --skip-official --json out.json

Both implementations load the same file: a random fp16 state dict in the official layout with realistic scales
(mixes in [0, 1], matrices ~ 1/sqrt(fan_in)), saved to a temporary .pth. One table:
  - decode tok/s at batch 1: official (`RWKV_V7_ON=1 RWKV_CUDA_ON=1`, strategy "cuda fp16", in a subprocess: the
    env vars act at import and it JIT-builds its CUDA ops), ours eager, CUDA graph, CUDA graph + torch.compile'd
    layers, CUDA graph + fused Triton step (the default); batched decode at B = 4, 8, 64 with the default choice
    (tokens/s summed over the streams); each as % of the bandwidth bound;
  - bound = weight bytes read per token (every parameter except the embedding, of which one row) / device copy
    bandwidth (a 1 GiB torch copy, bytes read + written over time);
  - prefill of 4096 tokens in one call (official: forward of the list; ours: `hidden` + head on the last position,
    eagerly, and `Decoder.prefill`, which replays CUDA graphs of 2048-token pieces);
  - cold start: a fresh process with empty Triton / Inductor caches, process start to the first generated token
    (load + prefill + first step, compile and capture included), our default path;
  - each model is measured in a fresh process of its own, ours and the official package's (as a user runs one);
  - correctness: our fp16 logits (prefill + decoder steps) vs our fp32 eager logits and vs the official
    package's, as ||a - b|| / ||b|| over the same tokens.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {  # n_layer, n_embd (head size 64, vocab 65536, ffn 4x, the official LoRA widths)
    "0.1B": (12, 768),
    "1.5B": (24, 2048),
}
VOCAB = 65536
PREFILL = 4096
BATCHES = (4, 8, 64)
CHECK_PROMPT, CHECK_STEPS = 32, 16  # tokens compared for correctness


# ---------------------------------------------------------------- the shared checkpoint


def random_v7_state_dict(n_layer: int, n_embd: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official RWKV-7 keys and shapes, random values at realistic scales, fp16 on the CPU (built on the GPU)."""
    from rwkvkit.models.common import RWKVConfig

    cfg = RWKVConfig("7", n_layer=n_layer, n_embd=n_embd, vocab_size=VOCAB)
    C, F, H, N = n_embd, cfg.dim_ffn, cfg.n_head, cfg.head_size
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device="cuda") * scale

    def unif(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, device="cuda")

    def mat(out_dim, in_dim):  # nn.Linear layout [out, in]
        return randn(out_dim, in_dim, scale=1 / math.sqrt(in_dim))

    def vec(lo=0.0, hi=1.0):
        return unif(lo, hi, 1, 1, C)

    def norm(prefix):
        return {prefix + ".weight": 1 + randn(C, scale=0.1), prefix + ".bias": randn(C, scale=0.1)}

    sd = {"emb.weight": randn(VOCAB, C), "head.weight": mat(VOCAB, C), **norm("ln_out"), **norm("blocks.0.ln0")}
    for i in range(n_layer):
        a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for prefix in (f"blocks.{i}.ln1", f"blocks.{i}.ln2", a + "ln_x"):
            sd.update(norm(prefix))
        for n in "rwkvag":
            sd[a + f"x_{n}"] = vec()
        sd[a + "w0"], sd[a + "a0"], sd[a + "v0"] = vec(-3, 1), vec(-1, 1), vec(-1, 1)
        for n, D in (("w", cfg.w_lora), ("a", cfg.a_lora), ("v", cfg.v_lora), ("g", cfg.g_lora)):
            sd[a + f"{n}1"] = randn(C, D, scale=1 / math.sqrt(C))
            sd[a + f"{n}2"] = randn(D, C, scale=0.5 / math.sqrt(D))
        sd[a + "k_k"], sd[a + "k_a"], sd[a + "r_k"] = vec(0.5, 1.0), vec(0.8, 1.2), randn(H, N, scale=0.3)
        for n in ("receptance", "key", "value", "output"):
            sd[a + n + ".weight"] = mat(C, C)
        sd[f + "x_k"] = vec()
        sd[f + "key.weight"], sd[f + "value.weight"] = mat(F, C), mat(C, F)
    return {k: v.half().cpu() for k, v in sd.items()}


# ---------------------------------------------------------------- measurements


def _seconds_per_call(fn, n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def copy_bandwidth() -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = _seconds_per_call(functools.partial(dst.copy_, src), 20)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / seconds


def weight_bytes_per_token(model) -> int:
    """What one decode step must read: every parameter, but of the embedding only the token's row."""
    total = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if name != "emb.weight")
    return total + model.emb.weight[0].numel() * model.emb.weight.element_size()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm())


def _token_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def measure_ours(path: Path, tokens: int) -> dict:
    from torch._dynamo.utils import counters

    from rwkvkit.models.checkpoint import load_checkpoint
    from rwkvkit.runtime.decode import Decoder

    out = {}
    # correctness first: fp32 eager reference, then the default fp16 path on the same tokens
    prompt, steps = _token_ids(CHECK_PROMPT, 1), _token_ids(CHECK_STEPS, 2)
    ref_model = load_checkpoint(path, device="cuda", dtype=torch.float32).eval()
    ref = ref_model(torch.tensor([prompt + steps], device="cuda"))[0][0, CHECK_PROMPT - 1 : -1]
    del ref_model
    torch.cuda.empty_cache()

    model = load_checkpoint(path, device="cuda", dtype=torch.float16).eval()
    out["bytes_per_token"] = weight_bytes_per_token(model)
    counters.clear()
    dec = Decoder(model)
    got = [dec.prefill(prompt)[0]] + [dec.step([t])[0] for t in steps[:-1]]
    out["logits_fp16"] = torch.stack(got).float().cpu()
    out["rel_err_vs_fp32"] = _rel(out["logits_fp16"], ref)
    out["compiled_graphs"] = counters["stats"]["unique_graphs"]

    ids = torch.randint(0, VOCAB, (max(BATCHES), tokens), device="cuda")
    position = [0]

    def decode_rate(decoder, batch):
        def one():
            decoder.step(ids[:batch, position[0] % tokens])
            position[0] += 1

        return batch / _seconds_per_call(one, tokens, warmup=5)

    assert dec.use_fused, "the default bsz1 decoder on CUDA should be the fused step"
    out["decode"] = {"graph+fused (default)": decode_rate(dec, 1)}
    for name, graph, compiled in (("eager", False, False), ("graph", True, False), ("graph+compile", True, True)):
        out["decode"][name] = decode_rate(Decoder(model, cuda_graph=graph, compile=compiled, fused=False), 1)
    for batch in BATCHES:
        batched = Decoder(model, batch_size=batch)
        kind = "fused" if batched.use_fused else "compile"
        out["decode"][f"B={batch} graph+{kind}"] = decode_rate(batched, batch)

    from rwkvkit.runtime.generation import last_logits

    long_ids = torch.randint(0, VOCAB, (1, PREFILL), device="cuda")
    out["prefill"] = {
        "eager forward": PREFILL / _seconds_per_call(functools.partial(last_logits, model, long_ids), 5, warmup=2),
        # pieces replayed as CUDA graphs; the warm-up calls record them
        "Decoder, CUDA graphs": PREFILL / _seconds_per_call(functools.partial(dec.prefill, long_ids), 5, warmup=2),
    }
    del dec

    # weight-only int8 matrices (strategy "cuda fp16i8"): half the bytes of the big matrices per token; its
    # "% of bound" column is still against the fp16 bound, as the issue defines it
    from rwkvkit.runtime.quant import quantize_int8

    quantize_int8(model)
    dec8 = Decoder(model)
    got8 = [dec8.prefill(prompt)[0]] + [dec8.step([t])[0] for t in steps[:-1]]
    out["rel_err_int8_vs_fp32"] = _rel(torch.stack(got8).float().cpu(), ref)
    out["decode"]["graph+fused int8"] = decode_rate(dec8, 1)
    del model, dec8
    torch.cuda.empty_cache()
    return out


def _official_worker(spec_path: str, out_path: str) -> None:
    """Runs in a subprocess: the official package reads its env vars at import and builds its CUDA ops."""
    from rwkv.model import RWKV

    spec = json.loads(Path(spec_path).read_text())
    prompt, steps = _token_ids(CHECK_PROMPT, 1), _token_ids(CHECK_STEPS, 2)
    results = {}
    with torch.no_grad():
        for size, entry in spec["models"].items():
            model = RWKV(model=entry["path"].removesuffix(".pth"), strategy="cuda fp16")
            logits, state = model.forward(prompt, None)
            got = [logits]
            for t in steps[:-1]:
                logits, state = model.forward([t], state)
                got.append(logits)
            ids = _token_ids(entry["tokens"], 3)
            position = [0]

            def one(forward=model.forward):
                nonlocal state
                _, state = forward([ids[position[0] % len(ids)]], state)
                position[0] += 1

            decode = 1 / _seconds_per_call(one, entry["tokens"], warmup=5)
            long_ids = _token_ids(PREFILL, 4)
            prefill = PREFILL / _seconds_per_call(functools.partial(model.forward, long_ids, None), 3, warmup=1)
            results[size] = {"logits": torch.stack(got).float().cpu(), "decode": decode, "prefill": prefill}
            del model, state
            torch.cuda.empty_cache()
    torch.save(results, out_path)


def measure_official(paths: dict[str, Path], tokens: dict[str, int], workdir: Path) -> dict:
    spec = workdir / "official_spec.json"
    spec.write_text(json.dumps({"models": {s: {"path": str(p), "tokens": tokens[s]} for s, p in paths.items()}}))
    out = workdir / "official_out.pt"
    env = {**os.environ, "RWKV_V7_ON": "1", "RWKV_CUDA_ON": "1", "RWKV_JIT_ON": "1"}
    cmd = [sys.executable, __file__, "--official-worker", str(spec), str(out)]
    return _run_worker(cmd, env, out, "official package")


def _run_worker(cmd: list[str], env: dict, out: Path, name: str) -> dict:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{name} failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}", flush=True)
        return {}
    return torch.load(out)


def measure_ours_apart(path: Path, tokens: int, workdir: Path) -> dict:
    """`measure_ours` in a fresh process per model, as a user runs one: neither model's compiled code, caches or
    allocator state is left for the other's measurements."""
    out = workdir / f"ours_{path.stem}.pt"
    cmd = [sys.executable, __file__, "--ours-worker", str(path), str(tokens), str(out)]
    return _run_worker(cmd, dict(os.environ), out, f"rwkvkit on {path.name}")


_COLD_SCRIPT = """
import sys, torch
from rwkvkit.models.checkpoint import load_checkpoint
from rwkvkit.runtime.decode import Decoder
model = load_checkpoint(sys.argv[1], device="cuda", dtype=torch.float16).eval()
dec = Decoder(model)
with torch.no_grad():
    token = int(dec.prefill(list(range(100, 164)))[0].argmax())
    token = int(dec.step([token])[0].argmax())
print("FIRST_TOKEN", token, flush=True)
"""


def measure_cold_start(path: Path, workdir: Path) -> float:
    """Seconds from starting a fresh interpreter (empty compiler caches) to its first generated token."""
    caches = {name: tempfile.mkdtemp(dir=workdir) for name in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _COLD_SCRIPT, str(path)], env={**os.environ, **caches}, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or "FIRST_TOKEN" not in proc.stdout:
        print(f"cold start failed:\n{(proc.stdout + proc.stderr)[-3000:]}", flush=True)
        return float("nan")
    return seconds


# ---------------------------------------------------------------- report


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None or x != x:
        return "-"
    return f"{x:,.0f}{unit}" if x >= 100 else f"{x:.3g}{unit}"


def report(results: dict, bandwidth: float) -> list[str]:
    lines = [
        f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write of a 1 GiB copy)",
        "",
        "| model | measurement | ours | official | ours / official | % of bound |",
        "|---|---|---|---|---|---|",
    ]
    for size, r in results.items():
        lines += report_rows(size, r, bandwidth)
    return lines


def report_rows(size: str, r: dict, bandwidth: float) -> list[str]:
    lines = []
    ours, official = r["ours"], r.get("official") or {}
    bound = bandwidth / ours["bytes_per_token"]
    lines.append(
        f"| {size} | bandwidth bound, bsz1 ({ours['bytes_per_token'] / 1e6:,.0f} MB/token) | {_fmt(bound)} tok/s |"
        " | | 100% |"
    )
    off_decode = official.get("decode")
    if off_decode:
        lines.append(f"| {size} | decode bsz1, official | | {_fmt(off_decode)} tok/s | | {100 * off_decode / bound:.1f}% |")
    for name, rate in ours["decode"].items():
        batched = name.startswith("B=")
        ratio = f"{rate / off_decode:.1f}x" if off_decode and not batched else ""
        pct = "" if batched else f"{100 * rate / bound:.1f}%"
        lines.append(f"| {size} | decode {name if batched else 'bsz1 ' + name} | {_fmt(rate)} tok/s | | {ratio} | {pct} |")
    off_prefill = official.get("prefill")
    for name, rate in ours["prefill"].items():
        ratio = f"{rate / off_prefill:.2f}x" if off_prefill else ""
        lines.append(f"| {size} | prefill {PREFILL} tokens, {name} | {_fmt(rate)} tok/s | {_fmt(off_prefill)} tok/s "
                     f"| {ratio} | |")
    if "cold_start" in r:
        lines.append(f"| {size} | cold start to first token (fresh caches) | {r['cold_start']:.1f} s | | | |")
    off_err = f"{r['rel_err_vs_official']:.2e}" if "rel_err_vs_official" in r else "-"
    lines.append(
        f"| {size} | logits rel. error: fp16 decoder vs our fp32 / vs official fp16 | "
        f"{ours['rel_err_vs_fp32']:.2e} | {off_err} | | |"
    )
    if "rel_err_int8_vs_fp32" in ours:
        lines.append(f"| {size} | logits rel. error: int8 decoder vs our fp32 | {ours['rel_err_int8_vs_fp32']:.2e} | | | |")
    lines.append(f"| {size} | torch.compile graphs for the bsz1 decoder | {ours['compiled_graphs']} | | | |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--tokens", type=int, default=200, help="decode steps timed (official 1.5B: half)")
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--skip-cold-start", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--official-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--ours-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.official_worker:
        _official_worker(*args.official_worker)
        return 0
    if args.ours_worker:
        path, tokens, out = args.ours_worker
        torch.save(measure_ours(Path(path), int(tokens)), out)
        return 0
    if not torch.cuda.is_available():
        print("gpu_inference.py needs a CUDA device")
        return 1

    import triton

    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, triton {triton.__version__}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        paths = {}
        for size in args.sizes:
            paths[size] = workdir / f"rwkv7-{size}.pth"
            torch.save(random_v7_state_dict(*SIZES[size]), paths[size])
        bandwidth = copy_bandwidth()
        official = {}
        if not args.skip_official:
            t = time.perf_counter()
            for size in args.sizes:  # one process per model, as for ours
                tokens = args.tokens // 2 if SIZES[size][1] >= 2048 else args.tokens
                official |= measure_official({size: paths[size]}, {size: tokens}, workdir)
            print(f"official package: {time.perf_counter() - t:.0f} s (its CUDA build included)", flush=True)
        results = {}
        for size in args.sizes:
            t = time.perf_counter()
            ours = measure_ours_apart(paths[size], args.tokens, workdir)
            if not ours:
                continue
            r = results[size] = {"ours": ours, "official": official.get(size)}
            if r["official"]:
                r["rel_err_vs_official"] = _rel(r["ours"]["logits_fp16"], r["official"]["logits"])
            if not args.skip_cold_start:
                r["cold_start"] = measure_cold_start(paths[size], workdir)
            print(f"{size}: {time.perf_counter() - t:.0f} s", flush=True)
            # each model's rows as soon as they exist: a run cut off by a time limit still reports what it measured
            print("\n".join(report_rows(size, r, bandwidth)), flush=True)
    print("\n".join(report(results, bandwidth)))
    if args.json:
        for r in results.values():
            r["ours"].pop("logits_fp16")
            if r["official"]:
                r["official"].pop("logits")
        args.json.write_text(json.dumps({"bandwidth": bandwidth, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
