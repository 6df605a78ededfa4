"""Full-model training throughput on a GPU: rwkvkit vs fla's RWKV7ForCausalLM, same shapes, same run.

    python benchmarks/gpu_train.py                         # v7 0.1B (L12 D768) and 0.4B (L24 D1024), ctx 4096
    python benchmarks/gpu_train.py --sizes 0.1B --micro-bsz 8 --profile 25

Both sides: fp32 master weights, bf16 autocast, AdamW, gradient clipping, the same random tokens, vocab 65536,
head size 64, no activation checkpointing (so 0.4B needs --micro-bsz 4 on an 80 GB card). rwkvkit runs its
trainer's pieces through benchmarks/train_throughput.py with the 0.1B recipe's settings (so torch.compile on:
--ours-extra="--train.compile false" for eager); fla runs `RWKV7ForCausalLM` with its fused cross-entropy +
L2Wrap (its defaults). MFU counts 6 x (parameters - embedding) FLOPs per token against the card's dense bf16 peak.
fla autotunes its kernels on the first call (minutes); set TRITON_CACHE_DIR to a kept folder to pay that once.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import shlex
import time

import torch

SIZES = {"0.1B": (12, 768), "0.4B": (24, 1024)}


def ours(L, D, B, T, steps, warmup, profile, extra):
    import train_throughput

    argv = ["--config", "configs/v7-0.1b.yaml", "--model.n_layer", str(L), "--model.n_embd", str(D),
            "--data.ctx_len", str(T), "--train.micro_bsz", str(B), "--train.grad_cp", "false",
            "--train.compile_mode", "default",  # the recipe's CUDA graphs pay at ctx 512, not at these lengths
            "--steps", str(steps), "--warmup", str(warmup), "--profile", str(profile), *extra]
    r = train_throughput.main(argv)
    return r["tokens_per_s"], r.get("peak_memory_gb")


def fla_model(L, D, B, T, steps, warmup):
    from fla.models import RWKV7Config, RWKV7ForCausalLM

    from rwkvkit.models import RWKVConfig

    dims = RWKVConfig("7", L, D, 65536)  # the same LoRA widths as the official recipe
    cfg = RWKV7Config(hidden_size=D, num_hidden_layers=L, head_dim=64, vocab_size=65536, intermediate_size=4 * D,
                      decay_low_rank_dim=dims.w_lora, a_low_rank_dim=dims.a_lora, v_low_rank_dim=dims.v_lora,
                      gate_low_rank_dim=dims.g_lora)
    torch.manual_seed(0)
    model = RWKV7ForCausalLM(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-18, fused=True)
    data = torch.randint(0, 65536, (B, T), generator=torch.Generator().manual_seed(0)).cuda()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=data, labels=data).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    tps = steps * B * T / (time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters()) - model.model.embeddings.weight.numel()
    return tps, torch.cuda.max_memory_allocated() / 2**30, n_params


def _print_row(row):
    """Each result as soon as it exists (a run cut off by a time limit still shows it)."""
    size, name, tps, mfu, mem = row
    print(f"{size} {name}: {tps:,.0f} tokens/s, MFU {mfu:.1%}, peak {mem:.1f} GiB", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--ctx-len", type=int, default=4096)
    p.add_argument("--micro-bsz", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", type=int, default=0, help="print our N most expensive kernels")
    p.add_argument("--skip-fla", action="store_true")
    p.add_argument("--skip-ours", action="store_true", help="fla alone (e.g. to fill its autotune cache)")
    p.add_argument("--ours-extra", default="", help='more `rwkvkit pretrain` flags for our side, one string: '
                   '--ours-extra="--train.compile true"')
    args = p.parse_args()

    from rwkvkit.models import RWKVConfig, build_model
    from rwkvkit.train.loop import matmul_flops_per_token, peak_flops

    dev = torch.device("cuda")
    peak = peak_flops(dev)
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {now:%Y-%m-%d %H:%M} UTC, "
          f"ctx {args.ctx_len}, micro_bsz {args.micro_bsz}, bf16 autocast, peak {peak / 1e12:.0f} TFLOP/s")
    rows = []
    for size in args.sizes:
        L, D = SIZES[size]
        T, B = args.ctx_len, args.micro_bsz
        flops = matmul_flops_per_token(build_model(RWKVConfig("7", L, D, 65536), init=False))
        if not args.skip_ours:
            extra = shlex.split(args.ours_extra)
            tps, mem = ours(L, D, B, T, args.steps, args.warmup, args.profile, extra)
            rows.append((size, "rwkvkit" + (f" {args.ours_extra}" if extra else ""), tps, tps * flops / peak, mem))
            _print_row(rows[-1])
            gc.collect()
            torch.cuda.empty_cache()
        if not args.skip_fla:
            try:
                f_tps, f_mem, f_params = fla_model(L, D, B, T, args.steps, args.warmup)
                rows.append((size, "fla RWKV7ForCausalLM", f_tps, f_tps * 6 * f_params / peak, f_mem))
                _print_row(rows[-1])
            except Exception as e:  # report the peer's failure in the table instead of losing our row
                rows.append((size, f"fla: {repr(e)[:70]}", float("nan"), float("nan"), float("nan")))
            gc.collect()
            torch.cuda.empty_cache()
    print("\n| model | impl | tokens/s | MFU | peak GiB | vs fla |")
    print("|---|---|---|---|---|---|")
    for size, name, tps, mfu, mem in rows:
        ref = next((r[2] for r in rows if r[0] == size and r[1].startswith("fla RWKV")), float("nan"))
        print(f"| v7 {size} | {name} | {tps:,.0f} | {mfu:.1%} | {mem:.1f} | {tps / ref:.2f}x |")


if __name__ == "__main__":
    main()
