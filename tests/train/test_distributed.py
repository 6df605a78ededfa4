"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 give the losses of one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
import torch

from rwkvkit.train.metrics import read_metrics
from train_helpers import PYTHON, config_args, tiny_config

STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses_of(corpus, out, procs: int, parallel: str = "auto") -> list[float]:
    cfg = tiny_config(corpus, out)
    cfg.train.exit_tokens = STEPS * 4 * 32
    cfg.train.micro_bsz = 4 // procs  # the same global batch of 4 x 32 tokens
    cfg.train.parallel = parallel
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [PYTHON, "-m", "rwkvkit"] if procs == 1 else [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(free_port()),
        "-m", "rwkvkit"]
    r = subprocess.run(launch + ["pretrain", *config_args(cfg)], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return [rec["loss"] for rec in read_metrics(out)]


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    return losses_of(corpus, tmp_path_factory.mktemp("single"), 1)


def test_ddp_two_processes_match_one(corpus, tmp_path, single):
    ddp = losses_of(corpus, tmp_path, 2, "ddp")
    assert len(ddp) == STEPS
    # same samples, same mean: only the order of float sums differs (gradient all-reduce)
    assert ddp == pytest.approx(single, rel=1e-5)
    assert (tmp_path / "rwkv-final.pth").is_file()


@pytest.mark.slow
def test_fsdp2_two_processes_match_one(corpus, tmp_path, single):
    fsdp = losses_of(corpus, tmp_path, 2, "fsdp")
    assert fsdp == pytest.approx(single, rel=1e-5)
    # the export gathers the shards into one complete official state dict
    sd = torch.load(tmp_path / "rwkv-final.pth")
    assert "blocks.0.ln0.weight" in sd and sd["emb.weight"].shape == (128, 64)
