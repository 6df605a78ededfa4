"""CPU speed of the WKV ops: naive per-token loop vs chunked form, forward and forward+backward.

Shapes are those of a 0.1B model layer (H=12 heads of N=64; wkv4 gets C = H*N = 768 channels) with inputs in the
ranges the models produce (rwkvkit.ops.testing). Forward runs under no_grad (inference / prefill); forward+backward
takes gradients of every input and the initial state (training). Each cell is the best wall time of `--runs` runs
and, in brackets, the best CPU time (all threads). On a shared machine the CPU time is the steadier number, so the
speed-up column divides CPU times; with --threads 1 on a quiet machine the two agree. The naive loop is timed once.

    .venv/bin/python benchmarks/cpu_ops.py [--T 512 2048] [--B 1 2] [--ops wkv7 wkv6 wkv4] [--runs 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from rwkvkit.ops.testing import wkv4_inputs, wkv6_inputs, wkv7_inputs
from rwkvkit.ops.wkv4 import wkv4_chunked, wkv4_naive
from rwkvkit.ops.wkv6 import wkv6_chunked, wkv6_naive
from rwkvkit.ops.wkv7 import wkv7_chunked, wkv7_naive

H, N = 12, 64
OPS = {
    "wkv7": (lambda B, T: wkv7_inputs(B, T, H, N), wkv7_naive, wkv7_chunked),
    "wkv6": (lambda B, T: wkv6_inputs(B, T, H, N), wkv6_naive, wkv6_chunked),
    "wkv4": (lambda B, T: wkv4_inputs(B, T, H * N), wkv4_naive, wkv4_chunked),
}


def timed(fn, inputs, state, backward: bool, runs: int) -> tuple[float, float]:
    """Best wall time and best CPU time over `runs`, in seconds."""
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(runs):
        leaves = [x.clone().requires_grad_(backward) for x in (*inputs, state)]
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.set_grad_enabled(backward):
            y, s = fn(*leaves)
            if backward:
                (y.square().mean() + s.square().mean()).backward()
        best_wall, best_cpu = min(best_wall, time.perf_counter() - wall), min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--B", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} threads, H={H} N={N}; seconds: best wall (best CPU)")
    print("| op | B | T | naive fwd | chunked fwd | naive fwd+bwd | chunked fwd+bwd | speed-up (CPU) fwd / fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.ops:
        make, naive, chunked = OPS[name]
        for B in args.B:
            for T in args.T:
                inputs, state = make(B, T)
                cells, cpus = [], {}
                for backward in (False, True):
                    for impl, fn in (("naive", naive), ("chunked", chunked)):
                        wall, cpu = timed(fn, inputs, state, backward, 1 if impl == "naive" else args.runs)
                        cpus[impl, backward] = cpu
                        cells.append(f"{wall:.3f} ({cpu:.2f})")
                ratio = [cpus["naive", bwd] / cpus["chunked", bwd] for bwd in (False, True)]
                speedup = f"{ratio[0]:.1f}x / {ratio[1]:.1f}x"
                print(f"| {name} | {B} | {T} | " + " | ".join(cells) + f" | {speedup} |", flush=True)


if __name__ == "__main__":
    main()
