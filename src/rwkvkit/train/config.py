"""Typed configuration of a training run. The CLI flags and the `--config recipe.yaml` format are generated from
these dataclasses (see `pretrain.build_parser`), so a recipe is exactly a nested dict of these fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

# RWKV-LM's "mini-epoch" = 40320 samples (= 8!, divisible by most batch sizes); only logging and exports use it here
MINI_EPOCH_SAMPLES = 40320


@dataclass
class ModelArgs:
    """Shape of the model to train (from scratch) or to load (`init_from`)."""

    version: Literal["4", "5.2", "6", "7"] = "7"
    """RWKV generation: 4, 5.2 (Eagle, x052), 6 (Finch, x060) or 7 (Goose, x070)."""
    n_layer: int = 12
    n_embd: int = 768
    vocab_size: int = 65536
    """65536 for the World tokenizer, 50277 (or 50304 padded) for the GPT-NeoX 20B tokenizer."""
    head_size: int = 64
    dim_ffn: Optional[int] = None
    """Channel-mix width; None = the version's default (4C for v4/v7, 3.5C rounded to 32 for v5/v6)."""
    init_from: Optional[str] = None
    """Start from these weights (official .pth or HF-style folder) instead of the official random init."""


@dataclass
class DataArgs:
    """Where the tokens come from: a binidx pair written by `rwkvkit prepare` (or RWKV-LM's make_data.py)."""

    data_file: str = ""
    """Path prefix of the binidx pair (`data/minipile` for data/minipile.bin + .idx)."""
    ctx_len: int = 512
    magic_prime: Optional[int] = None
    """RWKV-LM's sampler prime; None = computed from the data size and ctx_len."""
    separate_documents: bool = False
    """Start every document from a zero state: a window's documents (each ended by token 0) run as packed
    sequences (`cu_seqlens`), so no WKV state or token shift carries across an end token. RWKV-LM carries them."""


@dataclass
class OptimArgs:
    """AdamW and the learning-rate schedule (RWKV-LM's: warmup, then cosine by tokens from lr_init to lr_final)."""

    lr_init: float = 6e-4
    lr_final: float = 6e-5
    warmup_steps: int = 10
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-18
    weight_decay: float = 0.001
    """Applied only to 2-D weight matrices (embedding, head, projections)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class TrainArgs:
    """Batch, length, precision and the stopping point."""

    micro_bsz: int = 16
    """Samples per process per forward pass."""
    accumulate: int = 1
    """Micro-batches accumulated into one optimizer step."""
    exit_tokens: Optional[int] = None
    """Stop (with a final checkpoint) after this many tokens; None = the size of the data (one pass)."""
    precision: Literal["auto", "fp32", "tf32", "bf16"] = "auto"
    """auto = bf16 autocast on GPU, fp32 on CPU."""
    grad_cp: bool = False
    """Recompute each block in the backward pass (activation checkpointing): less memory, ~30% slower."""
    dropout: float = 0.0
    head_chunk: int = 4096
    """Tokens per chunk in the fused head + cross-entropy (bounds the logits memory); 0 = one chunk."""
    seed: int = 42
    device: str = "auto"
    """auto = cuda if available (this process's LOCAL_RANK under torchrun), else cpu."""
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    """Under torchrun: ddp (replicated weights) or fsdp (FSDP2, one shard group per block); auto = ddp."""
    compile: bool = False
    """torch.compile each block as two graphs, ln1 + time-mix + residual + ln2 and channel-mix + residual (GPU: ~2x
    tokens/s; the first step compiles ~1 min)."""
    compile_mode: Literal["default", "reduce-overhead"] = "default"
    """With compile: reduce-overhead also records the compiled parts as CUDA graphs, for short steps whose time
    goes to launching kernels (H100, 0.1B at ctx 512: +34% tokens/s; no gain at ctx 4096). More GPU memory."""
    compile_memory_budget: float = 1.0
    """With compile: activation checkpointing inside the compiled blocks. The share (0 to 1) of the activations
    they would save for the backward that they may keep; the cheapest rest is recomputed (torch's memory-budget
    partitioner). 1 = none recomputed; --train.grad_cp recomputes whole blocks instead (docs/pretrain.md)."""


@dataclass
class RunArgs:
    """Output folder, checkpoints, logging."""

    out_dir: str = "out/run"
    resume: str = "auto"
    """auto = continue from the newest checkpoint in out_dir if there is one; none = start fresh; or a checkpoint path."""
    save_every: int = 500
    """Optimizer steps between full checkpoints (0 = only the final one)."""
    keep_checkpoints: int = 2
    """How many full checkpoints to keep (the newest ones)."""
    export_every_epochs: int = 0
    """Also export official rwkv-N.pth weights every N mini-epochs (RWKV-LM's epoch_save); 0 = only at the end."""
    log_every: int = 10
    """Optimizer steps between printed metric lines (metrics.jsonl gets every step)."""
    logger: Literal["none", "tensorboard", "wandb"] = "none"
    wandb_project: str = "rwkvkit"
    progress_bar: bool = False
    """A tqdm bar instead of one line per log interval."""
    epoch_samples: int = MINI_EPOCH_SAMPLES
    """Samples per mini-epoch (train_log.txt line, rwkv-N.pth export); RWKV-LM fixes it at 40320."""


@dataclass
class PretrainConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    run: RunArgs = field(default_factory=RunArgs)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        return cls(
            model=ModelArgs(**d.get("model", {})),
            data=DataArgs(**d.get("data", {})),
            optim=OptimArgs(**d.get("optim", {})),
            train=TrainArgs(**d.get("train", {})),
            run=RunArgs(**d.get("run", {})),
        )
