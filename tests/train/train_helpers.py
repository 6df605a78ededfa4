"""Helpers for the training tests: a deterministic synthetic corpus and a tiny recipe (train_ prefix: test
directories share one import namespace)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from rwkvkit.data.binidx import BinIdxWriter
from rwkvkit.train.config import PretrainConfig

VOCAB = 128


def write_corpus(prefix: Path, n_docs: int = 200, seed: int = 0) -> Path:
    """A toy language: documents are sequences of 40 fixed 'words' (3-6 token ids each) drawn with Zipf-like
    frequencies, ending with token 0. Generated with numpy's PCG64, which is stable across numpy versions."""
    rng = np.random.default_rng(seed)
    words = [rng.integers(1, VOCAB, size=int(rng.integers(3, 7))) for _ in range(40)]
    freq = 1.0 / np.arange(1, 41)
    freq /= freq.sum()
    w = BinIdxWriter(prefix.with_suffix(".bin"), np.uint16)
    for _ in range(n_docs):
        picks = rng.choice(40, size=int(rng.integers(5, 30)), p=freq)
        w.add_item(np.concatenate([words[i] for i in picks] + [np.zeros(1, np.int64)]))
        w.end_document()
    w.finish(prefix.with_suffix(".idx"))
    return prefix


def tiny_config(corpus: Path, out_dir: Path, version: str = "7", **train) -> PretrainConfig:
    cfg = PretrainConfig.from_dict({
        "model": {"version": version, "n_layer": 2, "n_embd": 64, "vocab_size": VOCAB, "head_size": 32},
        "data": {"data_file": str(corpus), "ctx_len": 32},
        "optim": {"lr_init": 3e-3, "lr_final": 1e-3, "warmup_steps": 2, "weight_decay": 0.01},
        "train": {"micro_bsz": 4, "exit_tokens": 12 * 4 * 32, "device": "cpu", **train},
        "run": {"out_dir": str(out_dir), "save_every": 4, "log_every": 4},
    })
    return cfg


def config_args(cfg: PretrainConfig) -> list[str]:
    """The same config as CLI flags (for subprocess runs)."""
    args = []
    for section, values in cfg.to_dict().items():
        for k, v in values.items():
            if v is not None:
                args += [f"--{section}.{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return args


PYTHON = sys.executable


def deterministic_env() -> dict:
    """The environment for subprocess runs whose losses are compared bitwise: one thread and no dynamic MKL
    threading, so that float sums are ordered the same in every process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}
