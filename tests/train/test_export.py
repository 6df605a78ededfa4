"""Every version trains through the same loop, and its exported weights load in the official `rwkv` package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rwkvkit.train.metrics import read_metrics
from rwkvkit.train.pretrain import run
from train_helpers import tiny_config

pytest.importorskip("rwkv")

# runs in a fresh process: the package picks its v7 class from RWKV_V7_ON at import time
_OFFICIAL = textwrap.dedent("""
    import json, sys, torch
    import rwkv.model
    paths, tokens, out, v7 = json.loads(sys.argv[1])
    results = []
    for path in paths:
        model = rwkv.model.RWKV(path[:-len(".pth")] if v7 else path, "cpu fp32")
        results.append(model.forward(tokens, None, full_output=True)[0].float())
    torch.save(results, out)
""")

VERSIONS = ["7", "6", "5.2", "4"]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_version_trains_and_exports_official_weights(corpus, tmp_path, version):
    cfg = tiny_config(corpus, tmp_path, version=version)
    cfg.train.exit_tokens = 3 * 4 * 32  # 3 steps
    run(cfg)
    ls = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(ls) == 3 and all(torch.isfinite(torch.tensor(ls))) and ls[-1] < ls[0]

    pth = tmp_path / "rwkv-final.pth"
    sd = torch.load(pth, map_location="cpu")
    assert all(v.dtype == torch.bfloat16 for v in sd.values())  # RWKV-LM's training dtype
    tokens = [1, 17, 42, 99, 3, 3, 120, 0, 5]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_")}
    env.update(RWKV_JIT_ON="0", RWKV_CUDA_ON="0", RWKV_V7_ON="1" if version == "7" else "0")
    # the package loads the bf16 file as is; for v4-v6 it applies its load-time transforms (exp of the decays...)
    # in the stored dtype, which costs ~1e-3 of logit accuracy, so the exact comparison uses an fp32 copy
    fp32 = tmp_path / "fp32" / "rwkv-final.pth"
    fp32.parent.mkdir()
    torch.save({k: v.float() for k, v in sd.items()}, fp32)
    out = tmp_path / "official.pt"
    job = [[str(pth), str(fp32)], tokens, str(out), version == "7"]
    r = subprocess.run([sys.executable, "-c", _OFFICIAL, json.dumps(job)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    official_bf16, official = torch.load(out)

    import rwkvkit

    ours_pth = rwkvkit.load(str(pth), dtype=torch.float32, tokenizer=None)
    ours_folder = rwkvkit.load(str(tmp_path / "rwkv-final"), dtype=torch.float32, tokenizer=None)
    with torch.no_grad():
        a, _ = ours_pth(tokens)
        b, _ = ours_folder(tokens)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, official, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a, official_bf16, rtol=0, atol=2e-2)


def test_training_continues_from_exported_weights(corpus, tmp_path):
    first = tiny_config(corpus, tmp_path / "a")
    run(first)
    trained_loss = read_metrics(tmp_path / "a")[-1]["loss"]
    again = tiny_config(corpus, tmp_path / "b")
    again.model.init_from = str(tmp_path / "a" / "rwkv-final.pth")
    again.train.exit_tokens = 4 * 32  # one step
    run(again)
    # starts where the first run ended (bf16 export), not at the ~5.0 of a fresh init
    assert read_metrics(tmp_path / "b")[0]["loss"] < trained_loss + 0.5
