"""Data-parallel scaling of `rwkvkit pretrain`: 1 process, then N processes with DDP and with FSDP2, same per-GPU batch.

    python benchmarks/ddp_scaling.py --gpus 2 --ctx-len 1024 --micro-bsz 8 --steps 12
    python benchmarks/ddp_scaling.py --gpus 2 --device cpu --tiny      # the same plumbing on CPU (gloo)

Each run is a real `torchrun -m rwkvkit pretrain` on random tokens (a binidx file made here), so it measures the
trainer as users run it: DDP gradient all-reduce or FSDP2 sharding, clipping, AdamW, checkpoint and export at the
end. tokens/s is the median of the per-step `tokens_per_s` in each run's metrics.jsonl after the first steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def make_data(prefix: Path, n_tokens: int, vocab: int) -> None:
    from rwkvkit.data.binidx import BinIdxWriter, token_dtype

    rng = np.random.default_rng(0)
    writer = BinIdxWriter(f"{prefix}.bin", token_dtype(vocab))
    for _ in range(max(n_tokens // 65536, 1)):
        writer.add_item(np.append(rng.integers(1, vocab, 65535), 0))
        writer.end_document()
    writer.finish(f"{prefix}.idx")


def run(nproc: int, parallel: str, args, data: Path, out: Path) -> dict:
    model = ["--model.n_layer", "2", "--model.n_embd", "64", "--model.head_size", "16"] if args.tiny else [
        "--model.n_layer", str(args.n_layer), "--model.n_embd", str(args.n_embd)]
    steps_tokens = args.steps * args.micro_bsz * args.ctx_len * nproc
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "rwkvkit", "pretrain", *model, "--data.data_file", str(data), "--data.ctx_len", str(args.ctx_len),
           "--train.micro_bsz", str(args.micro_bsz), "--train.exit_tokens", str(steps_tokens),
           "--train.device", args.device, "--train.parallel", parallel, "--train.grad_cp", str(args.grad_cp).lower(),
           "--run.out_dir", str(out), "--run.resume", "none", "--run.log_every", "1", "--run.save_every", "100000"]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tps = [r["tokens_per_s"] for r in recs[args.skip:]] or [recs[-1]["tokens_per_s"]]
    return {"processes": nproc, "parallel": parallel, "tokens_per_s": statistics.median(tps),
            "final_loss": recs[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--ctx-len", type=int, default=1024)
    ap.add_argument("--micro-bsz", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=3, help="first steps left out of the median (compilation, warm-up)")
    ap.add_argument("--grad-cp", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer width-64 model (plumbing check on CPU)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_tokens = max(4 * args.gpus * args.steps * args.micro_bsz * (args.ctx_len + 1), 1 << 20)
        make_data(tmp / "random", n_tokens, 65536)
        rows = [run(1, "ddp", args, tmp / "random", tmp / "r1")]
        for parallel in ("ddp", "fsdp"):
            rows.append(run(args.gpus, parallel, args, tmp / "random", tmp / f"r{args.gpus}{parallel}"))
    base = rows[0]["tokens_per_s"]
    print(f"\n{'processes':>9} {'parallel':>8} {'tokens/s':>10} {'scaling':>8} {'final loss':>10}")
    for r in rows:
        print(f"{r['processes']:>9} {r['parallel']:>8} {r['tokens_per_s']:>10.0f} {r['tokens_per_s'] / base:>7.2f}x "
              f"{r['final_loss']:>10.3f}")


if __name__ == "__main__":
    main()
