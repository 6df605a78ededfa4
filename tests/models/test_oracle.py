"""Our logits == the official `rwkv` package's (0.8.32, strategy "cpu fp32") on the same official-layout files.

The package reads RWKV_V7_ON / RWKV_JIT_ON / RWKV_CUDA_ON when `rwkv.model` is imported (v7 is a different class
chosen at import), so it runs in a fresh subprocess per family with a controlled environment (TorchScript off for
v4-v6: same math, faster start; the v7 class scripts itself regardless). With "cpu fp32" it applies no fp16
rescaling (RESCALE_LAYER is 0 unless the strategy says fp16); its other load-time transforms (ln0 folded into emb,
transposes, exp of the decays) do not change the math, so the comparison is like for like.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rwkvkit.models.checkpoint import load_checkpoint

pytest.importorskip("rwkv")

_ORACLE = textwrap.dedent(
    """
    import json, sys, torch
    import rwkv.model
    jobs = json.loads(sys.argv[1])
    for job in jobs:
        path = job["path"]
        # the v7 class appends ".pth" itself; the v4-v6 class accepts the full name
        if job["v7"]:
            model = rwkv.model.RWKV(path[:-4], "cpu fp32")
        else:
            model = rwkv.model.RWKV(path, "cpu fp32", verbose=False)
        tokens = job["tokens"]
        seq, _ = model.forward(tokens, None, full_output=True)
        state, steps = None, []
        for t in tokens:
            logits, state = model.forward([t], state)
            steps.append(logits.float())
        torch.save({"seq": seq.float(), "steps": torch.stack(steps)}, job["out"])
    """
)

VERSIONS = ["4", "5.2", "6", "7"]


def _run_oracle(jobs: list[dict], v7: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_")}
    env.update(RWKV_JIT_ON="0", RWKV_CUDA_ON="0", RWKV_V7_ON="1" if v7 else "0", CUDA_VISIBLE_DEVICES="")
    for job in jobs:
        job["v7"] = v7
    proc = subprocess.run(
        [sys.executable, "-c", _ORACLE, json.dumps(jobs)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, official_sd):
    """version -> (checkpoint path, tokens, the official package's outputs)."""
    tmp = tmp_path_factory.mktemp("oracle")
    jobs = {}
    for i, version in enumerate(VERSIONS):
        path = tmp / f"v{version}.pth"
        torch.save(official_sd(version, seed=10 + i), path)
        tokens = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(i)).tolist()
        jobs[version] = {"path": str(path), "tokens": tokens, "out": str(tmp / f"v{version}.out.pt")}
    _run_oracle([jobs[v] for v in VERSIONS if v != "7"], v7=False)
    _run_oracle([jobs["7"]], v7=True)
    return {v: (job["path"], job["tokens"], torch.load(job["out"])) for v, job in jobs.items()}


@torch.no_grad()
@pytest.mark.parametrize("version", VERSIONS)
def test_logits_match_official_package(oracle, version):
    path, tokens, official = oracle[version]
    model = load_checkpoint(path).eval()
    seq, _ = model(tokens)
    assert (seq - official["seq"]).abs().max() <= 1e-4
    state, steps = None, []
    for t in tokens:
        logits, state = model([t], state)
        steps.append(logits[0])
    assert (torch.stack(steps) - official["steps"]).abs().max() <= 1e-4
    # the logits are informative (not all ~0), so agreement is meaningful
    assert official["seq"].std() > 0.3
