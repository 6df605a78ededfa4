"""`rwkvkit pretrain`: train an RWKV model from scratch on binidx data.

    rwkvkit pretrain --config configs/v7-0.1b.yaml --data.data_file data/minipile --run.out_dir out/L12-D768
    torchrun --nproc_per_node 8 -m rwkvkit pretrain --config configs/v7-1.5b.yaml --train.parallel fsdp ...

Every flag is generated from the dataclasses in `rwkvkit.train.config`; a recipe YAML holds the same keys.
Re-running the same command continues from the newest checkpoint in --run.out_dir (`--run.resume auto`).
"""

from __future__ import annotations

import sys
from typing import Optional

from rwkvkit.train.config import PretrainConfig


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the field docstrings become --help text
    parser = ArgumentParser(prog="rwkvkit pretrain", description=__doc__.split("\n\n")[0],
                            default_env=False, exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="a recipe YAML (see configs/)")
    parser.add_argument("--resume", type=Optional[str], default=None,
                        help="shorthand for --run.resume: auto, none or a checkpoint path")
    parser.add_class_arguments(PretrainConfig, fail_untyped=True, sub_configs=True)
    return parser


def parse_config(argv: list[str]) -> PretrainConfig:
    d = build_parser().parse_args(argv).as_dict()
    d.pop("config", None)
    d.pop("__path__", None)
    resume = d.pop("resume", None)
    if resume is not None:
        d["run"]["resume"] = resume
    return PretrainConfig.from_dict(d)


def build_model_for(cfg: PretrainConfig, device=None):
    """The model of the recipe with the official init (or `init_from` weights) and its RWKVConfig, built directly
    on `device` (a 7B model would take minutes to initialise, and 28 GB, on a CPU)."""
    import torch

    from rwkvkit.models import RWKVConfig, build_model

    m = cfg.model
    if m.init_from:
        from rwkvkit import load

        model = load(m.init_from, device="cpu", dtype=torch.float32, tokenizer=None)
        model.requires_grad_(True)  # loaded for inference, frozen
        return model, model.config
    mc = RWKVConfig(version=m.version, n_layer=m.n_layer, n_embd=m.n_embd, vocab_size=m.vocab_size,
                    head_size=m.head_size, dim_ffn=m.dim_ffn)
    torch.manual_seed(cfg.train.seed)  # the same init on every rank
    with torch.device(device or "cpu"):
        return build_model(mc, init=True), mc


def run(cfg: PretrainConfig) -> dict:
    import torch

    from rwkvkit.train import parallel
    from rwkvkit.train.data import num_tokens, open_pretrain_data
    from rwkvkit.train.loop import Trainer

    info = parallel.setup(cfg.train.device)
    finished = False
    try:
        # the data first: a wrong path should fail in a second, not after building a large model
        data = open_pretrain_data(cfg.data.data_file, cfg.data.ctx_len, cfg.train.micro_bsz, info.world_size,
                                  cfg.data.magic_prime,
                                  vocab_size=None if cfg.model.init_from else cfg.model.vocab_size)
        model, mc = build_model_for(cfg, info.device)
        torch.manual_seed(cfg.train.seed + info.rank)  # dropout differs per rank, reproducibly
        if info.is_main:
            n = sum(p.numel() for p in model.parameters())
            print(f"RWKV-{mc.version} L{mc.n_layer} D{mc.n_embd} V{mc.vocab_size}: {n / 1e6:.2f}M parameters; "
                  f"data {num_tokens(data)} tokens, magic_prime {data.sampler.magic_prime}; "
                  f"{info.world_size} process(es) on {info.device}", flush=True)
        trainer = Trainer(cfg, model, data, info, model_config=mc.to_dict())
        result = trainer.fit()
        finished = True
        return result
    finally:
        parallel.teardown(finished)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    run(cfg)
    return 0
