"""Training throughput (tokens/s) and peak memory of one `rwkvkit pretrain` configuration, on random tokens.

    python benchmarks/train_throughput.py --config configs/v7-0.1b.yaml --data.ctx_len 4096 --train.micro_bsz 8
    python benchmarks/train_throughput.py --config configs/v7-tiny-cpu.yaml --steps 5 --json out.json

It runs the trainer's own pieces (the loss module, AdamW groups, clipping, autocast, activation checkpointing),
so the number is what `rwkvkit pretrain` gets minus data loading (which is a memory map and negligible). Any
`rwkvkit pretrain` flag works; the data file is not needed. GPU: bf16 autocast by default (`--train.precision`).
The WKV op is whatever `rwkvkit.ops` dispatches to on that device (plain PyTorch until a kernel lands).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import sys
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, compile, caches)")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile one step and print the N most expensive kernels")
    ap.add_argument("--doc-len", type=int, default=0, metavar="MEAN",
                    help="end tokens (0) at random places: documents of about MEAN tokens, cut anew every step (with "
                         "--data.separate_documents true they run as packed sequences)")
    ap.add_argument("-h", "--help", action="store_true")
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.help:
        ap.print_help()
        print("\nplus every `rwkvkit pretrain` option (rwkvkit pretrain --help)")
        return {}

    from rwkvkit.data.dataset import Batch
    from rwkvkit.models import RWKVConfig, build_model
    from rwkvkit.train.loop import LMObjective, matmul_flops_per_token, peak_flops
    from rwkvkit.train.optim import build_optimizer, set_lr
    from rwkvkit.train.parallel import checkpoint_blocks, setup
    from rwkvkit.train.pretrain import parse_config

    cfg = parse_config(rest)
    info = setup(cfg.train.device)
    dev = info.device
    m, t = cfg.model, cfg.train
    mc = RWKVConfig(m.version, m.n_layer, m.n_embd, m.vocab_size, head_size=m.head_size, dim_ffn=m.dim_ffn)
    torch.manual_seed(0)
    model = build_model(mc, init=True).to(dev)
    if t.compile:
        model.compile_blocks(t.compile_mode, memory_budget=t.compile_memory_budget)
    if t.grad_cp:
        checkpoint_blocks(model)
    precision = t.precision if t.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    objective = LMObjective(model, t.head_chunk, dtype)
    opt = build_optimizer(model.named_parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-18, weight_decay=0.1)
    set_lr(opt, 1e-4)
    params = [p for g in opt.param_groups for p in g["params"]]
    B, T = t.micro_bsz, cfg.data.ctx_len
    gen = torch.Generator().manual_seed(0)
    batches = []  # (tokens on the device, cu_seqlens on the host or None); one batch, or one per step with --doc-len
    for _ in range(args.warmup + args.steps + 1 if args.doc_len else 1):
        x = torch.randint(1 if args.doc_len else 0, m.vocab_size, (B, T + 1), generator=gen)
        if args.doc_len:
            x[torch.rand(x.shape, generator=gen) < 1 / args.doc_len] = 0
        cu = None
        if cfg.data.separate_documents:
            cu = torch.from_numpy(Batch(x[:, :-1].numpy(), x[:, 1:].numpy()).document_cu_seqlens())
        batches.append((x.to(dev), cu))
    next_batch = itertools.cycle(batches).__next__

    def step():
        data, cu = next_batch()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = objective(data[:, :-1], data[:, 1:], cu_seqlens=cu)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(args.warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    dt = time.perf_counter() - t0
    tps = args.steps * B * T / dt
    result = {
        "model": f"RWKV-{m.version} L{m.n_layer} D{m.n_embd} V{m.vocab_size}",
        "params": sum(p.numel() for p in model.parameters()),
        "ctx_len": T, "micro_bsz": B, "precision": precision, "grad_cp": t.grad_cp, "compile": t.compile,
        "doc_len": args.doc_len, "separate_documents": cfg.data.separate_documents,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, "
                                                                             f"{platform.processor() or platform.machine()})",
        "torch": torch.__version__, "tokens_per_s": round(tps, 1), "step_time_s": round(dt / args.steps, 4),
        "final_loss": round(loss.item(), 4),
    }
    if t.compile:  # (packed sequences: their count changes the graphs' shapes from step to step)
        from torch._dynamo.utils import counters

        result["compiled_graphs"] = counters["stats"]["unique_graphs"]
    if dev.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
        peak = peak_flops(dev)
        if peak:
            result["mfu"] = round(tps * matmul_flops_per_token(model) / peak, 4)
    else:  # the process's peak resident set (Linux reports KiB)
        result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    print(json.dumps(result, indent=2))
    if args.profile:
        _profile(step, sync, dev, args.profile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _profile(step, sync, dev, top: int) -> None:
    """One step under torch.profiler: where the time goes, kernel by kernel (device time on GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60))


if __name__ == "__main__":
    main()
