"""Run the official `rwkv` package on a ChatRWKV-style loop, in its own process (it reads env vars at import).

Usage: python official_runner.py SPEC.json OUT.pt. SPEC: {"v7": bool, "prompt": [ids], "steps": [ids],
"models": {name: path without .pth}}. OUT gets, per name, the logits of the prompt call (full_output) and of each
one-token step, and the final flat state. The official package loads v7 only with RWKV_V7_ON=1, and then only v7,
so v7 and v4-v6 need separate runs.
"""

import json
import os
import sys


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec["v7"]:
        os.environ["RWKV_V7_ON"] = "1"
    else:
        os.environ.setdefault("RWKV_JIT_ON", "0")  # TorchScript compilation would only slow this short run down
    import torch
    from rwkv.model import RWKV

    results = {}
    for name, path in spec["models"].items():
        model = RWKV(model=path, strategy="cpu fp32")
        out, state = model.forward(spec["prompt"], None, full_output=True)
        logits = [out.float()]
        for token in spec["steps"]:
            out, state = model.forward([token], state)
            logits.append(out.float())
        results[name] = {"logits": logits, "state": [s.float() for s in state]}
    torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
