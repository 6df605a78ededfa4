"""WKV7 / WKV6 / WKV4 on a GPU: our Triton kernels (several configs) vs fla, timed and checked against float64.

    python benchmarks/gpu_wkv.py                                  # WKV7, both issue shapes, our default config
    python benchmarks/gpu_wkv.py --variants all --profile --odd-length 1013
    python benchmarks/gpu_wkv.py --op wkv6 --fla                  # fla autotunes for minutes on its first call
    python benchmarks/gpu_wkv.py --op wkv4                        # Triton chunk scan vs our chunked PyTorch path
    python benchmarks/gpu_wkv.py --packed 512 --fla --odd-length 1013   # packed sequences (cu_seqlens)

WKV7 inputs look like a real RWKV-7 layer's (decay in (e^{-e^{-0.5}}, 1), a = -kk, b = kk * iclr, |kk| = 1),
WKV6 ones like RWKV-6's (w = -exp(N(-1, 0.5))), bf16 (u float32); WKV4 [B, T, C = H*N] bf16 keys and values with
float32 w = -exp(N(0, 1)) and u per channel, as the v4 model passes them.
Time: median of triton.testing.do_bench over fwd (y only) and fwd+bwd (dy on y, gradients of all inputs).
Error: ||out - ref|| / ||ref|| against a float64 recurrence on the same bf16 inputs (batch 0 only, with a random
initial state and a random gradient on the final state too), listed as a multiple of the bf16 floor
||bf16(ref) - ref|| / ||ref|| of that quantity; "worst" is the largest multiple over y, state and all gradients.
--packed MEAN: the B x T tokens of each shape as one row of sequences of random lengths (1 to 2 MEAN, cu_seqlens),
each from its own state, beside the same tokens as B rows of T; the odd-length check packs its T the same way.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util

import torch
import triton

from rwkvkit.ops.testing import V7_MIN_LOG_DECAY
from rwkvkit.ops.varlen import cu_seqlens_of, per_sequence
from rwkvkit.ops.wkv6.triton_chunk import wkv6_triton
from rwkvkit.ops.wkv7.triton_chunk import DEFAULT_CONFIG, KernelConfig, wkv7_triton

SHAPES = {"0.1B": (8, 4096, 12, 64), "1.5B": (4, 4096, 32, 64)}
QUANTITIES = {
    "wkv7": ["y", "state", "dr", "dw", "dk", "dv", "da", "db", "ds0"],
    "wkv6": ["y", "state", "dr", "dw", "dk", "dv", "du", "ds0"],
    "wkv4": ["y", "dw", "du", "dk", "dv"],  # no state: its (aa, bb, pp) form has no meaningful random gradient
}


def _config(chunk=16, state="tf32r", chunk_dots="tf32r", solve="tf32r", block_v=32, **kw):
    return KernelConfig(chunk=chunk, precision_state=state, precision_chunk=chunk_dots, precision_solve=solve,
                        block_v=block_v, **kw)


VARIANTS = {  # H100 history in docs/gpu.md: ieee 6x slower, raw tf32 1.78x the floor, chunk 32 spills
    "default": None,
    "default-tf32r": DEFAULT_CONFIG._replace(precision_state="tf32r", precision_chunk="tf32r",
                                             precision_solve="tf32r"),  # WKV7's default without fp16 operands
    "c32g16-tf32r-v32": _config(chunk=32, grad_chunk=16),  # WKV7's default
    "c32g32-tf32r-v32-g8": _config(chunk=32, grad_chunk=32, warps_grad=8),
    "c32g32-tf32r-v32": _config(chunk=32, grad_chunk=32),
    "c32g32-tf32r-v64": _config(chunk=32, grad_chunk=32, block_v=64),
    "c16-tf32r-v32": _config(),
    "c16-tf32r-v64": _config(block_v=64),
    "c16h-tf32r-v64": _config(block_v=64, pair_levels=1),  # WKV6: steep chunks' pairs split per half chunk
    "c32l1-tf32r": _config(chunk=32, grad_chunk=32, block_v=None, pair_levels=1),  # WKV6: one split, floor -8
    "c16-tf32r-v16": _config(block_v=16),
    "c16-tf32r-v16-w2": _config(block_v=16, warps_seq=2),
    "c16-tf32r-v32-s1": _config(stages_seq=1),
    "c16-tf32r-v32-s2": _config(stages_seq=2),
    "c16-tf32r-v32-s4": _config(stages_seq=4),
    "c16-tf32r-v16-s4": _config(block_v=16, stages_seq=4),
    "c16-tf32r-v32-g8": _config(warps_grad=8),
    "c16-tf32r-v32-perdot": _config(round_once=False),
    "c16-mixed-v32": _config(chunk_dots="ieee"),
    "c16-tf32-v32": _config(state="tf32", chunk_dots="tf32", solve="tf32"),
    "c16-ieee-v64": _config(state="ieee", chunk_dots="ieee", solve="ieee", block_v=64),
}
DEFAULT_VARIANT = {"wkv7": "default", "wkv6": "default"}


def rwkv7_inputs(B, T, H, N, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    w = -torch.exp(-torch.nn.functional.softplus(-randn(B, T, H, N)) - 0.5)
    kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
    a, b = -kk, kk * torch.sigmoid(randn(B, T, H, N))
    return [x.to(dtype) for x in (r, w, k, v, a, b)]


def rwkv6_inputs(B, T, H, N, dtype, seed=0, log_decay_min=None, log_decay_mu=-1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    w = -torch.exp(randn(B, T, H, N) * 0.5 + log_decay_mu)  # mu = -1: a few in 10^6 below -4.2 (B8: a dozen)
    if log_decay_min is not None:
        w = w.clamp(min=log_decay_min)
    return [x.to(dtype) for x in (r, w, k, v)] + [randn(H, N) * 0.5]


def rwkv4_inputs(B, T, H, N, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    C = H * N
    w = -torch.exp(torch.randn(C, generator=g, device="cuda"))
    u = torch.randn(C, generator=g, device="cuda") * 0.5
    k, v = (torch.randn(B, T, C, generator=g, device="cuda").to(dtype) for _ in range(2))
    return [w, u, k, v]


def reference4_fp64(w, u, k, v, s0):
    from rwkvkit.ops.wkv4 import wkv4_naive

    return wkv4_naive(w, u, k, v, s0)


def reference6_fp64(r, w, k, v, u, s0):
    r, w, k, v, u = (x.double() for x in (r, w, k, v, u))
    S = s0.double()
    ys = []
    for t in range(r.shape[1]):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append((r[:, t, :, None, :] @ (S + u[None, :, :, None] * kv)).squeeze(-2))
        S = w[:, t].exp()[..., None] * S + kv
    return torch.stack(ys, 1), S


def reference_fp64(r, w, k, v, a, b, s0):
    """The recurrence step by step in float64 (the definition, nothing clever)."""
    r, w, k, v, a, b = (x.double() for x in (r, w, k, v, a, b))
    S = s0.double()
    decay = w.exp()
    ys = []
    for t in range(r.shape[1]):
        sa = S @ a[:, t, :, :, None]
        S = S * decay[:, t, :, None, :] + sa * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append((S @ r[:, t, :, :, None]).squeeze(-1))
    return torch.stack(ys, 1), S


def ours(op, cfg, cu_seqlens=None):
    if op == "wkv7":  # with the decay bound the model passes (rwkv7_inputs keep it), as fla's lower_bound path
        return lambda *args: wkv7_triton(*args, config=cfg, log_decay_min=V7_MIN_LOG_DECAY, cu_seqlens=cu_seqlens)
    # cfg None: the kernel's own default (WKV6: steep chunks taken by a second pass, see its module)
    return lambda *args: wkv6_triton(*args, config=cfg, cu_seqlens=cu_seqlens)


def ours4(impl, cu_seqlens=None):
    from rwkvkit.ops.wkv4 import wkv4

    return lambda w, u, k, v, s0: wkv4(w, u, k, v, s0, impl=impl, cu_seqlens=cu_seqlens)


def fla_rwkv6(cu_seqlens=None):
    from fla.ops.rwkv6 import chunk_rwkv6

    def run(r, w, k, v, u, s0):
        y, s = chunk_rwkv6(r, k, v, w, u, scale=1.0, initial_state=s0, output_final_state=True,
                           cu_seqlens=cu_seqlens)
        return y, s

    return run


def fla_rwkv7(cu_seqlens=None, **options):
    from fla.ops.rwkv7 import chunk_rwkv7

    def run(r, w, k, v, a, b, s0):
        # fla keeps the state key-major [B, H, K, V]; ours is value-major
        s0 = None if s0 is None else s0.transpose(-1, -2)
        y, s = chunk_rwkv7(r, w, k, v, a, b, initial_state=s0, output_final_state=True, cu_seqlens=cu_seqlens,
                           **options)
        return y, s.transpose(-1, -2)

    return run


def packed_lengths(total, mean, seed=0):
    """Random sequence lengths from 1 to 2 mean (the last cut) that sum to total."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(1, 2 * mean + 1, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - total
    return lengths


def outputs_and_grads(fn, inputs, s0, dy, ds):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    if s0 is None:  # outputs and gradients of y alone
        y, _ = fn(*leaves, None)
        y.backward(dy)
        return [y.detach()] + [x.grad for x in leaves]
    s0 = s0.detach().clone().requires_grad_()
    y, s = fn(*leaves, s0)
    torch.autograd.backward((y, s), (dy, ds))
    return [y.detach(), s.detach()] + [x.grad for x in leaves] + [s0.grad]


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def reference(op, inputs, seed, cu_seqlens=None):
    """float64 outputs and gradients on batch element 0 (random initial state and final-state gradient too); with
    cu_seqlens, of the sequences packed in it (a state and a final-state gradient each)."""
    one = [x[:1] if x.dim() >= 3 else x for x in inputs]
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    if op == "wkv4":
        k = one[2]
        s0 = ds = None
        dy = torch.randn(k.shape, generator=g, device="cuda").to(k.dtype)
        ref = outputs_and_grads(reference4_fp64, [x.double() for x in one], None, dy.double(), None)
        return (one, s0, dy, ds), ref, [rel_err(x.to(torch.bfloat16), x) for x in ref]
    B, T, H, N = one[0].shape
    n_seqs = 1 if cu_seqlens is None else len(cu_seqlens) - 1
    s0 = torch.randn(n_seqs, H, N, N, generator=g, device="cuda") * 0.5
    dy = torch.randn(1, T, H, N, generator=g, device="cuda").to(one[0].dtype)
    ds = torch.randn(n_seqs, H, N, N, generator=g, device="cuda")
    ref_fn = reference_fp64 if op == "wkv7" else reference6_fp64
    if cu_seqlens is not None:
        ref_fn = packed_reference(ref_fn, cu_seqlens, 6 if op == "wkv7" else 4)
    ref = outputs_and_grads(ref_fn, [x.double() for x in one], s0.double(), dy.double(), ds.double())
    floor = [rel_err(x.to(torch.bfloat16), x) for x in ref]
    return (one, s0, dy, ds), ref, floor


def packed_reference(ref_fn, cu_seqlens, per_token):
    """ref_fn on each packed sequence alone (its per-token inputs sliced, the others as they are)."""
    def run(*x):
        tokens, per_head, s0 = x[:per_token], x[per_token:-1], x[-1]
        return per_sequence(lambda *t: ref_fn(*t[:-1], *per_head, t[-1]), cu_seqlens, tokens, s0)

    return run


def error_multiples(fn, case, ref, floor):
    """||out - ref|| / ||ref|| of every output and gradient, as a multiple of its bf16 floor."""
    try:
        got = outputs_and_grads(fn, *case)
    except Exception as e:  # a peer that cannot take this input still gets a row
        return repr(e)[:80]
    return [rel_err(x, rx) / f for x, rx, f in zip(got, ref, floor)]


def timings(fn, inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    dy = torch.randn_like(inputs[3])

    def fwd():
        with torch.no_grad():
            fn(*leaves, None)

    def fwd_bwd():
        y, _ = fn(*leaves, None)
        torch.autograd.backward(y, dy)

    def bench(f):
        return triton.testing.do_bench(f, warmup=100, rep=500, grad_to_none=leaves, return_mode="median")

    return bench(fwd), bench(fwd_bwd)


def kernel_breakdown(fn, inputs):
    """Device time per kernel over one fwd+bwd (torch.profiler), to see which stage to work on."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    dy = torch.randn_like(inputs[3])
    for _ in range(2):
        y, _ = fn(*leaves, None)
        torch.autograd.backward(y, dy)
    for x in leaves:
        x.grad = None  # else the profiled backward also accumulates into the warm-up's gradients
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y, _ = fn(*leaves, None)
        torch.autograd.backward(y, dy)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])[:6]


def functions(args, names, cu_seqlens=None):
    """{name: fn(*inputs, s0)} of ours (each variant) and the peers asked for; with cu_seqlens, packed calls."""
    tag = "" if cu_seqlens is None else " packed"
    if args.op == "wkv4" and cu_seqlens is not None:  # (the PyTorch path runs packed sequences one by one)
        fns = {"ours wkv4 triton packed": ours4("triton", cu_seqlens)}
    elif args.op == "wkv4":  # one Triton kernel (no configs), beside the PyTorch path
        fns = {"ours wkv4 triton": ours4("triton"), "ours wkv4 chunked (PyTorch)": ours4("chunked")}
    else:
        fns = {f"ours {args.op} {n}{tag}": ours(args.op, VARIANTS[n], cu_seqlens) for n in names}
    if args.fla and args.op == "wkv7":
        if args.fla != "lower_bound":
            fns[f"fla chunk_rwkv7{tag}"] = fla_rwkv7(cu_seqlens)
        if args.fla != "default":
            fns[f"fla chunk_rwkv7 lower_bound{tag}"] = fla_rwkv7(cu_seqlens, lower_bound=V7_MIN_LOG_DECAY)
    elif args.fla and args.op == "wkv6":
        fns[f"fla chunk_rwkv6{tag}"] = fla_rwkv6(cu_seqlens)
    if args.peer and cu_seqlens is None:
        spec = importlib.util.spec_from_file_location("bench_peer", args.peer)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fns.update(module.peer_fns(args.op))
    return fns


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="wkv7", choices=["wkv7", "wkv6", "wkv4"])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--variants", nargs="*", default=None,
                   help="names from VARIANTS, or 'all' (default: the op's default config)")
    p.add_argument("--fla", nargs="?", const="both", choices=["both", "default", "lower_bound"],
                   help="add fla's chunk_rwkv7 / chunk_rwkv6 (its first call autotunes for minutes); WKV7: its "
                        "default path, its lower_bound path (as fast as it gets with v7's decay bound) or both")
    p.add_argument("--peer", default=None, metavar="FILE",
                   help="a Python file whose peer_fns(op) returns more {name: fn} to time beside ours (peers whose "
                        "code may not live in this repository, e.g. RWKV-LM's CUDA kernels built from a local copy)")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--odd-length", type=int, default=0, help="also check accuracy at this T (batch 1)")
    p.add_argument("--profile", action="store_true", help="per-kernel device time of our variants")
    p.add_argument("--log-decay-min", type=float, default=None,
                   help="WKV6: clamp the random log decays from below (at -4.2 no chunk is steep)")
    p.add_argument("--log-decay-mu", type=float, default=-1.0,
                   help="WKV6: log decays are -exp(0.5 z + mu) (mu = 2: about -7.4 per token, so every 32-token "
                        "chunk is too steep for the split around its middle token)")
    p.add_argument("--packed", type=int, default=0, metavar="MEAN",
                   help="also time each shape's tokens packed as sequences of mean length MEAN")
    args = p.parse_args()
    names = list(VARIANTS) if args.variants == ["all"] else args.variants or [DEFAULT_VARIANT.get(args.op)]
    quantities = QUANTITIES[args.op]
    make_inputs = {"wkv7": rwkv7_inputs, "wkv6": rwkv6_inputs, "wkv4": rwkv4_inputs}[args.op]
    if args.op == "wkv6":
        make_inputs = functools.partial(rwkv6_inputs, log_decay_min=args.log_decay_min, log_decay_mu=args.log_decay_mu)
    fns = functions(args, names)
    packed = args.packed
    device = torch.cuda.get_device_name()
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# {device}, torch {torch.__version__}, triton {triton.__version__}, {now:%Y-%m-%d %H:%M} UTC")
    if args.odd_length:
        B, T, H, N = 1, args.odd_length, 12, 64
        checks = [(None, fns)]
        if packed and args.op != "wkv4":  # (the WKV4 packed check is the kernel tests')
            lengths = packed_lengths(T, max(T // 8, 1), seed=7)
            cu = cu_seqlens_of(lengths).cuda()
            print(f"  packed T={T}: {len(lengths)} sequences, lengths {lengths}")
            checks.append((cu, functions(args, names, cu)))
        for cu, check_fns in checks:
            case, ref, floor = reference(args.op, make_inputs(B, T, H, N, torch.bfloat16, seed=7), 7, cu)
            for name, fn in check_fns.items():
                err = error_multiples(fn, case, ref, floor)
                cells = " ".join(f"{q}={e:.2f}" for q, e in zip(quantities, err)) if isinstance(err, list) else err
                print(f"  T={T} {name}: err/floor {cells}", flush=True)
    rows = []
    for shape_name in args.shapes:
        B, T, H, N = SHAPES[shape_name]
        inputs = make_inputs(B, T, H, N, torch.bfloat16)
        if not args.no_accuracy:
            case, ref, floor = reference(args.op, inputs, seed=0)
            print(f"{shape_name} bf16 floor: " + " ".join(f"{q}={f:.2e}" for q, f in zip(quantities, floor)))
        timed = [(name, fn, inputs) for name, fn in fns.items()]
        if packed:
            lengths = packed_lengths(B * T, args.packed)
            cu = cu_seqlens_of(lengths).cuda()
            print(f"  {shape_name} packed: {B * T} tokens in {len(lengths)} sequences of 1 to {2 * args.packed}")
            one_row = [x.reshape(1, B * T, *x.shape[2:]) if x.dim() >= 3 else x for x in inputs]
            timed += [(name, fn, one_row) for name, fn in functions(args, names, cu).items()]
        for name, fn, inputs in timed:
            err = None if args.no_accuracy or "packed" in name else error_multiples(fn, case, ref, floor)
            try:
                t_fwd, t_all = timings(fn, inputs)
            except Exception as e:
                t_fwd = t_all = float("nan")
                err = err if isinstance(err, str) else repr(e)[:80]
            rows.append((shape_name, name, t_fwd, t_all, err))
            worst = f"{max(err):.2f}" if isinstance(err, list) else err or "-"
            times = f"fwd {t_fwd:.3f} ms, fwd+bwd {t_all:.3f} ms"
            print(f"  {shape_name} {name}: {times}, worst err/floor {worst}", flush=True)
            if args.profile and name.startswith("ours"):
                for kernel, ms in kernel_breakdown(fn, inputs):
                    print(f"    {ms:8.3f} ms  {kernel[:90]}")
        if not args.no_accuracy:
            del case, ref
            torch.cuda.empty_cache()
    print(f"\n| shape B,T,H,N | impl | fwd ms | fwd+bwd ms | worst err/floor | {' | '.join(quantities)} |")
    print("|---|---|---|---|---|" + "---|" * len(quantities))
    for shape_name, name, t_fwd, t_all, err in rows:
        shape = ",".join(map(str, SHAPES[shape_name]))
        if isinstance(err, list):
            cells = f"{max(err):.2f} | " + " | ".join(f"{e:.2f}" for e in err)
        else:
            cells = f"{err or '-'} |" + " |" * (len(quantities) - 1)
        print(f"| {shape} | {name} | {t_fwd:.3f} | {t_all:.3f} | {cells} |")


if __name__ == "__main__":
    main()
