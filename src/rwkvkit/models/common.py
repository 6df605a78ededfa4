"""Pieces shared by every RWKV version: the config, the recurrent State, and the model skeleton.

A model is `emb -> [block 0 applies ln0] -> blocks -> ln_out -> head`; each block is
`x = x + att(ln1(x)); x = x + ffn(ln2(x))`. The version files (v4.py ... v7.py) only provide the time-mix (`att`)
and channel-mix (`ffn`) modules and their official initialisation.

GPT mode ([B, T]) and RNN mode (T = 1) run the same code: the token shift reads the previous token's LayerNorm
output from the state, and the WKV op continues from the state's matrix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from rwkvkit.errors import CheckpointError, ConfigError, TokenizerError

VERSIONS = ("4", "5.2", "6", "7")

# Pretraining inits keep LayerNorm/GroupNorm affine params and these small per-channel tensors as set by the module.
_KEEP_MODULE_INIT = ("ln_", ".ln", "time_", "_mask", "pos_emb", ".mask.")


def _v7_lora_dim(x: float) -> int:
    """The train_temp rule: round to a multiple of 32 (Python's round), at least 32."""
    return max(32, round(x / 32) * 32)


@dataclass
class RWKVConfig:
    """Architecture of one RWKV model; every field can be read from an official checkpoint's shapes.

    `dim_att`/`dim_ffn` default to the official training defaults of the version. LoRA dims: v6 uses
    `mix_lora`/`decay_lora` (32/64 in RWKV-LM); v7 uses `w_lora`, `a_lora`, `v_lora`, `g_lora` (defaults from
    the RWKV-v7 train_temp formulas, e.g. 64/64/32/128 at n_embd 768). v4 has no heads (`head_size` unused).
    """

    version: str
    n_layer: int
    n_embd: int
    vocab_size: int
    head_size: int = 64
    dim_att: int | None = None
    dim_ffn: int | None = None
    mix_lora: int = 32
    decay_lora: int = 64
    w_lora: int | None = None
    a_lora: int | None = None
    v_lora: int | None = None
    g_lora: int | None = None

    def __post_init__(self):
        self.version = str(self.version)
        if self.version in ("5", "5.0", "5.1"):
            raise ConfigError(f"RWKV-{self.version} is not supported (only the released 5.2 'Eagle' layout is)")
        if self.version not in VERSIONS:
            raise ConfigError(f"unknown RWKV version {self.version!r}; expected one of {', '.join(VERSIONS)}")
        C = self.n_embd
        if self.dim_att is None:
            self.dim_att = C
        if self.dim_ffn is None:
            self.dim_ffn = int((3.5 * C) // 32 * 32) if self.version in ("5.2", "6") else 4 * C
        if self.version == "7":
            root = math.sqrt(C)
            self.w_lora = self.w_lora or _v7_lora_dim(2.5 * root)
            self.a_lora = self.a_lora or _v7_lora_dim(2.5 * root)
            self.v_lora = self.v_lora or _v7_lora_dim(1.7 * root)
            self.g_lora = self.g_lora or _v7_lora_dim(5 * root)
            if self.dim_att != C:
                raise ConfigError(f"RWKV-7 needs dim_att == n_embd (got {self.dim_att} and {C})")
        if min(self.n_layer, C, self.vocab_size, self.dim_att, self.dim_ffn) <= 0:
            raise ConfigError("n_layer, n_embd, vocab_size, dim_att and dim_ffn must be positive")
        if self.version != "4" and self.dim_att % self.head_size:
            raise ConfigError(f"dim_att {self.dim_att} is not a multiple of head_size {self.head_size}")

    @property
    def n_head(self) -> int:
        return self.dim_att // self.head_size

    def lora_dims(self) -> dict[str, int]:
        """The LoRA widths that this version uses (empty for v4 and v5.2)."""
        if self.version == "6":
            return {"mix_lora": self.mix_lora, "decay_lora": self.decay_lora}
        if self.version == "7":
            return {"w_lora": self.w_lora, "a_lora": self.a_lora, "v_lora": self.v_lora, "g_lora": self.g_lora}
        return {}

    def to_dict(self) -> dict:
        """Only the fields that matter for this version, so config.json stays readable."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("mix_lora", "decay_lora", "w_lora", "a_lora", "v_lora", "g_lora"):
            if name not in self.lora_dims():
                del out[name]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> RWKVConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown RWKVConfig field(s): {', '.join(unknown)}")
        return cls(**d)


@dataclass
class State:
    """The recurrent state of a batch: everything needed to continue a sequence.

    att_x, ffn_x: [L, B, C] the previous token's ln1 / ln2 outputs (token shift), in the model dtype.
    wkv: float32, per layer: v4 [L, B, 3, A] = (aa, bb, pp); v5.2/v6 [L, B, H, N_k, N_v] (key-major);
    v7 [L, B, H, N_v, N_k] (value-major) -- the official layouts.
    Models never modify a State in place; they return a new one.
    """

    att_x: torch.Tensor
    wkv: torch.Tensor
    ffn_x: torch.Tensor
    version: str

    @property
    def batch_size(self) -> int:
        return self.att_x.shape[1]

    @property
    def n_layer(self) -> int:
        return self.att_x.shape[0]

    @classmethod
    def zeros(cls, config: RWKVConfig, batch_size: int = 1, device=None, dtype=torch.float32) -> State:
        """The state before any token (v4's pp = -1e38 so that the empty history weighs exactly nothing)."""
        L, C, A = config.n_layer, config.n_embd, config.dim_att
        x = torch.zeros(L, batch_size, C, device=device, dtype=dtype)
        if config.version == "4":
            wkv = torch.zeros(L, batch_size, 3, A, device=device, dtype=torch.float32)
            wkv[:, :, 2] = -1e38
        else:
            N = config.head_size
            wkv = torch.zeros(L, batch_size, A // N, N, N, device=device, dtype=torch.float32)
        return cls(x, wkv, x.clone(), config.version)

    def clone(self) -> State:
        return State(self.att_x.clone(), self.wkv.clone(), self.ffn_x.clone(), self.version)

    def to(self, device=None, dtype=None) -> State:
        """Move to a device; `dtype` applies to the token-shift tensors only (the WKV state stays float32)."""
        return State(
            self.att_x.to(device=device, dtype=dtype),
            self.wkv.to(device=device),
            self.ffn_x.to(device=device, dtype=dtype),
            self.version,
        )

    def detach(self) -> State:
        return State(self.att_x.detach(), self.wkv.detach(), self.ffn_x.detach(), self.version)

    def copy_(self, other: State) -> State:
        """Copy other's tensors into this state's own, in place (static buffers of CUDA graphs); returns self."""
        if other.wkv.shape != self.wkv.shape or other.att_x.shape != self.att_x.shape:
            raise ConfigError(f"cannot copy a state of shape {list(other.wkv.shape)} (WKV) into one of "
                              f"{list(self.wkv.shape)}: different model or batch size")
        self.att_x.copy_(other.att_x)
        self.wkv.copy_(other.wkv)
        self.ffn_x.copy_(other.ffn_x)
        return self

    def select(self, index) -> State:
        """The states of some batch rows (an int, slice, list or index tensor)."""
        if isinstance(index, int):
            index = [index]
        return State(self.att_x[:, index], self.wkv[:, index], self.ffn_x[:, index], self.version)

    @classmethod
    def cat(cls, states: list[State]) -> State:
        """Stack the batch rows of several states (same model) into one batch."""
        return cls(
            torch.cat([s.att_x for s in states], dim=1),
            torch.cat([s.wkv for s in states], dim=1),
            torch.cat([s.ffn_x for s in states], dim=1),
            states[0].version,
        )

    def save(self, path) -> None:
        """Write as safetensors with the RWKV version in the metadata (atomically)."""
        from safetensors.torch import save_file

        from rwkvkit.models.checkpoint import atomic_path

        tensors = {name: getattr(self, name).detach().contiguous().cpu() for name in ("att_x", "wkv", "ffn_x")}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "rwkvkit-state", "version": self.version})

    @classmethod
    def load(cls, path, device="cpu") -> State:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"state file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in ("att_x", "wkv", "ffn_x")}
        except Exception as e:  # safetensors raises several unrelated types for foreign or damaged files
            raise CheckpointError(f"{path}: not an rwkvkit state file ({_first_line(e)})") from None
        if meta.get("format") != "rwkvkit-state":
            raise CheckpointError(f"{path}: not an rwkvkit state file (no rwkvkit-state metadata)")
        return cls(tensors["att_x"], tensors["wkv"], tensors["ffn_x"], meta.get("version", "7"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """TokenizerError for the first id outside [0, vocab_size), for ids on the CPU.

    Checked where the ids are: on the CPU that is free, on an accelerator it would be a host sync per call (per
    training micro-step, per decoded token). Ids already on an accelerator are not checked: the embedding's own
    device-side bounds assertion stops a bad id there (a CUDA error at the next sync, not a TokenizerError).
    """
    if ids.device.type == "cpu":
        outside = (ids < 0) | (ids >= vocab_size)
        if bool(outside.any()):
            raise TokenizerError(f"token id {ids[outside][0].item()} is outside the vocabulary [0, {vocab_size})")


class Packing(NamedTuple):
    """Sequences packed in one row [1, T_total] (`cu_seqlens` [N + 1], as the WKV ops take it), and what the token
    shift needs: a sequence's first token reads its own x_prev row, every other token the token before it; the
    state a sequence leaves is its last token, or its x_prev if it is empty. Index tensors made on the device
    without waiting for it."""

    cu_seqlens: torch.Tensor
    first_at: torch.Tensor  # [N]: sequence i's first token, or T_total (a spare row) if it is empty
    last_from: torch.Tensor  # [N]: sequence i's state row in cat(x_prev [N, C], x[0] [T_total, C])

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, total: int, device: torch.device) -> Packing:
        """total = T_total, known from the tokens (reading it from device cu_seqlens would wait for the GPU)."""
        cu = cu_seqlens.to(device=device, dtype=torch.long, non_blocking=True)
        n = cu.numel() - 1
        nonempty = cu[1:] > cu[:-1]
        first_at = torch.where(nonempty, cu[:-1], total)
        last_from = torch.where(nonempty, n + cu[1:] - 1, torch.arange(n, device=device))
        return cls(cu_seqlens, first_at, last_from)


def packed_cu_seqlens(packing: Packing | None) -> torch.Tensor | None:
    """The cu_seqlens a time-mix hands its WKV op: packing's, or None for ordinary [B, T] rows."""
    return None if packing is None else packing.cu_seqlens


def token_shift(x: torch.Tensor, x_prev: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
    """x [B, T, C] shifted one step later in time; position 0 gets x_prev [B, C] (the state). Packed ([1, T, C],
    x_prev [N, C]): each sequence's first token gets its own x_prev row."""
    if packing is not None:
        # the plain shift with each sequence's x_prev copied over its first token (empty sequences' onto a spare
        # last row): a gather of every token from cat(x_prev, x) cost a [T_total, C] scatter-add in the backward,
        # 5.5 ms of a 0.1B training step (H100)
        shifted = torch.cat((x.new_zeros(1, x.shape[2]), x[0]))
        return shifted.index_copy(0, packing.first_at, x_prev.to(x.dtype))[:-1].unsqueeze(0)
    if x.shape[1] == 1:
        return x_prev.unsqueeze(1)
    return torch.cat((x_prev.unsqueeze(1), x[:, :-1]), dim=1)


def last_token(x: torch.Tensor, x_prev: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
    """The token-shift state x leaves, [B, C]: its last token; packed, [N, C], each sequence's (x_prev if empty)."""
    if packing is not None:
        return torch.cat((x_prev.to(x.dtype), x[0])).index_select(0, packing.last_from)
    return x[:, -1]


def in_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype when autocast is on (else unchanged). LayerNorm and fp32 parameters give fp32 under
    autocast; what only feeds 16-bit matmuls and kernels can be 16-bit from the start: half the bytes in every
    kernel that reads it, and in what backward keeps of it."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class Block(nn.Module):
    """One layer: pre-LN time-mix and channel-mix with residuals. Block 0 also owns ln0 (applied to the embedding)."""

    def __init__(self, config: RWKVConfig, layer_id: int, att: nn.Module, ffn: nn.Module):
        super().__init__()
        C = config.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = att
        self.ffn = ffn

    def forward(self, x, att_x, wkv, ffn_x, v_first, packing: Packing | None = None):
        x, xf, att_last, wkv, v_first = self.time_mix_residual(x, att_x, wkv, v_first, packing)
        x = self.channel_mix_residual(x, xf, ffn_x, packing)
        return x, att_last, wkv, last_token(xf, ffn_x, packing), v_first

    def time_mix_residual(self, x, att_x, wkv, v_first, packing=None):
        """ln1, time-mix and residual, and ln2 of the result: in training one compiled graph (compile_blocks), in
        which the residual stream's two gradients (through ln2, and past it) meet."""
        xa = in_autocast_dtype(self.ln1(x))
        att_x = att_x.to(xa.dtype)
        out, wkv, v_first = self.att(xa, att_x, wkv, v_first, packing)
        x = x + out
        return x, in_autocast_dtype(self.ln2(x)), last_token(xa, att_x, packing), wkv, v_first

    def channel_mix_residual(self, x, xf, ffn_x, packing=None):
        return x + self.ffn(xf, ffn_x.to(xf.dtype), packing)


class RWKVModel(nn.Module):
    """Base of the four versions. Subclasses name their `TimeMix` and `ChannelMix` classes (each built as
    `cls(config, layer_id)`) and implement `init_weights`.

    `model(idx, state=None) -> (logits, new_state)`: idx is [B, T] (or a list of ids / 1-D tensor, then logits
    are [T, V] and the state has batch 1). `model.hidden(...)` returns the ln_out output instead of logits.
    `model(idx, state, cu_seqlens=cu)`: idx holds N sequences packed in one row ([1, T_total] or 1-D), cu [N + 1]
    marks where each starts (as the WKV ops take it); each runs from its own state (batch N) and nothing crosses a
    boundary, so the logits equal those of each sequence run alone and the new state has one row per sequence.
    """

    version: str = ""
    time_mix: type[nn.Module]
    channel_mix: type[nn.Module]

    def __init__(self, config: RWKVConfig):
        super().__init__()
        if config.version != self.version:
            raise ConfigError(f"{type(self).__name__} is RWKV-{self.version}, config says {config.version}")
        self.config = config
        C, V = config.n_embd, config.vocab_size
        self.emb = nn.Embedding(V, C)
        self.blocks = nn.ModuleList(
            Block(config, i, self.time_mix(config, i), self.channel_mix(config, i)) for i in range(config.n_layer)
        )
        self.ln_out = nn.LayerNorm(C)
        self.head = nn.Linear(C, V, bias=False)
        self.tokenizer = None

    def init_weights(self) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- running

    def _as_batch(self, idx) -> tuple[torch.Tensor, bool]:
        """[B, T] long ids on the model's device, and whether the caller gave a single sequence."""
        V = self.config.vocab_size
        device = self.emb.weight.device
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, (list, tuple)):
            if len(idx) == 0:
                raise TokenizerError("empty token sequence")
            try:
                idx = torch.tensor(idx)  # checked on the CPU below: no device sync while decoding
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise TokenizerError("token ids must be integers (a list of int, or a 1-D / 2-D tensor)") from None
        if not isinstance(idx, torch.Tensor):
            raise TokenizerError(f"expected token ids (list of int or tensor), got {type(idx).__name__}")
        if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dim() not in (1, 2):
            raise TokenizerError(f"token ids must be a 1-D or 2-D integer tensor, got {idx.dtype} {list(idx.shape)}")
        single = idx.dim() == 1
        if single:
            idx = idx.unsqueeze(0)
        if idx.shape[1] == 0:
            raise TokenizerError("empty token sequence")
        check_token_ids(idx, V)
        return idx.to(device=device, dtype=torch.long), single

    def _check_state(self, state: State, batch: int) -> None:
        cfg = self.config
        if state.version != cfg.version:
            raise ConfigError(f"this state belongs to an RWKV-{state.version} model, not RWKV-{cfg.version}")
        if state.n_layer != cfg.n_layer or state.att_x.shape[2] != cfg.n_embd:
            raise ConfigError(
                f"state shape {list(state.att_x.shape)} does not fit this model (n_layer {cfg.n_layer}, "
                f"n_embd {cfg.n_embd})"
            )
        if state.batch_size != batch:
            raise ConfigError(f"state has batch size {state.batch_size} but the input has {batch}")

    def _run(self, idx, state: State | None, cu_seqlens: torch.Tensor | None = None):
        idx, single = self._as_batch(idx)
        packing = None
        if cu_seqlens is not None:
            from rwkvkit.ops.varlen import check_cu_seqlens

            n_seqs = check_cu_seqlens(cu_seqlens, idx, None)
            packing = Packing.build(cu_seqlens, idx.shape[1], idx.device)
        if state is not None:
            self._check_state(state, idx.shape[0] if packing is None else n_seqs)
        x, state = self.run_unchecked(idx, state, packing=packing)
        return x, state, single

    def run_unchecked(self, idx: torch.Tensor, state: State | None = None, run_block=None,
                      packing: Packing | None = None):
        """The core of `hidden`, without its input checks: idx must be a [B, T] long tensor on the model's device
        and state None or a State of this model and batch. Nothing in it waits for the device, so it can be
        captured in a CUDA graph (`rwkvkit.runtime.decode`). `run_block(i, x, att_x, wkv, ffn_x, v_first)`, if
        given, runs layer i in place of `self.blocks[i](...)` (the decoder passes compiled layer steps). packing:
        idx is one row of packed sequences and the state has one row per sequence (`Packing.build`); not with
        run_block, whose layer steps take ordinary rows. Returns (ln_out output [B, T, C], new State)."""
        if run_block is not None and packing is not None:
            raise ValueError("run_unchecked takes run_block or packing, not both: run_block's layer steps take "
                             "ordinary [B, T] rows")
        x = self.emb(idx)
        if state is None:
            batch = idx.shape[0] if packing is None else packing.last_from.shape[0]
            state = State.zeros(self.config, batch, device=x.device, dtype=x.dtype)
        att_x, wkv, ffn_x = [], [], []
        v_first = None
        for i, block in enumerate(self.blocks):
            if i == 0:
                x = block.ln0(x)
            args = (x, state.att_x[i], state.wkv[i], state.ffn_x[i], v_first)
            if packing is not None:
                x, ax, s, fx, v_first = block(*args, packing)
            else:
                x, ax, s, fx, v_first = block(*args) if run_block is None else run_block(i, *args)
            att_x.append(ax)
            wkv.append(s)
            ffn_x.append(fx)
        new_state = State(torch.stack(att_x), torch.stack(wkv), torch.stack(ffn_x), self.config.version)
        return self.ln_out(x), new_state

    def forward(self, idx, state: State | None = None, *, cu_seqlens: torch.Tensor | None = None):
        x, state, single = self._run(idx, state, cu_seqlens)
        logits = self.head(x)
        return (logits[0] if single else logits), state

    def hidden(self, idx, state: State | None = None, *, cu_seqlens: torch.Tensor | None = None):
        """Like forward but returns the ln_out output [.., T, C] (for a fused head + loss)."""
        x, state, single = self._run(idx, state, cu_seqlens)
        return (x[0] if single else x), state

    def compile_blocks(self, mode: str = "default", memory_budget: float | None = None, **options) -> None:
        """torch.compile each block for training, the WKV kernel an opaque op inside: ln1 + time-mix + residual +
        ln2 as one graph, the channel-mix + residual as another. Every layer runs the same code with its own weights
        as graph inputs, so a model compiles three graphs (RWKV-7's layer 0 time-mix is the third).

        ln2 goes with the time-mix, not with the channel-mix: on torch 2.11 + CUDA, Inductor's backward of a graph
        holding ln2 and the channel-mix returned the channel-mix's [1, 1, C] mix gradient as [C] (from 8k tokens per
        micro-batch on the H100), and autograd rejected it.

        memory_budget (0 to 1): activation checkpointing inside the graphs. The share of the activations that
        the compiler's default partition would save for the backward which it may keep; it recomputes the cheapest
        of the rest in the backward (torch's memory-budget partitioner, `torch._functorch.config.
        activation_memory_budget`, set only while these graphs compile and run). None or 1: the default partition.
        """
        from rwkvkit.ops import preload_kernels

        preload_kernels()
        if mode != "default":  # torch.compile's mode ("reduce-overhead": CUDA graphs too)
            options["mode"] = mode
        for block in self.blocks:
            # an instance attribute shadows the method that Block.forward calls
            block.time_mix_residual = _with_memory_budget(torch.compile(block.time_mix_residual, **options),
                                                          memory_budget)
            block.channel_mix_residual = _with_memory_budget(torch.compile(block.channel_mix_residual, **options),
                                                             memory_budget)

    def zero_state(self, batch_size: int = 1) -> State:
        return State.zeros(self.config, batch_size, device=self.emb.weight.device, dtype=self.emb.weight.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------- init helpers

    @torch.no_grad()
    def _init_matrices(self):
        """RWKV-LM's generate_init_weight (v5+) for emb, head and the Linear weights.

        emb ~ U(-1e-4, 1e-4); head orthogonal with gain 0.5*sqrt(V/C) (0.5 if V <= C); other matrices orthogonal
        with gain 1, except the output projections (zero) and key/gate (0.1). ln_x.weight = ((1+l)/L)^0.7.
        """
        cfg = self.config
        V, C, L = cfg.vocab_size, cfg.n_embd, cfg.n_layer
        zero = (".att.output.", ".ffn.value.", ".ffn.receptance.")
        small = (".att.key.", ".att.gate.")
        for name, p in self.named_parameters():
            full = "." + name
            if name.endswith("ln_x.weight"):
                layer = int(name.split(".")[1])
                p.fill_(((1 + layer) / L) ** 0.7)
            elif name == "emb.weight":
                nn.init.uniform_(p, -1e-4, 1e-4)
            elif name == "head.weight":
                nn.init.orthogonal_(p, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
            elif any(s in full for s in _KEEP_MODULE_INIT) or ".weight" not in full or p.dim() != 2:
                continue
            elif any(s in full for s in zero):
                p.zero_()
            else:
                nn.init.orthogonal_(p, gain=0.1 if any(s in full for s in small) else 1.0)

    @torch.no_grad()
    def _init_norms(self):
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def _with_memory_budget(compiled, budget: float | None):
    """The compiled function, compiled and run with torch's activation memory budget set to budget (compile_blocks)."""
    if budget is not None and not 0.0 <= budget <= 1.0:
        raise ConfigError(f"the activation memory budget is a share between 0 and 1, got {budget}")
    if budget is None or budget == 1.0:
        return compiled
    from torch._functorch import config as functorch_config

    def run(*args, **kwargs):
        with functorch_config.patch(activation_memory_budget=budget):
            return compiled(*args, **kwargs)

    return run


def channel_ramp(config: RWKVConfig, layer_id: int, n: int | None = None):
    """The per-layer constants of the official "fancy" inits: (ddd[c] = c/C, r01 = l/(L-1), r1a0 = 1 - l/L)."""
    L = config.n_layer
    n = config.n_embd if n is None else n
    ddd = torch.arange(n, dtype=torch.float32) / config.n_embd
    r01 = layer_id / (L - 1) if L > 1 else 0.0
    r1a0 = 1.0 - layer_id / L
    return ddd, r01, r1a0


def zigzag(n: int) -> torch.Tensor:
    """((i + 1) mod 3) - 1: the 0, 1, -1 pattern that the v4/v5/v6 inits add to time_first/time_faaaa."""
    return ((torch.arange(n) + 1) % 3 - 1).float()


def group_norm(x: torch.Tensor, ln_x: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm over heads of [B, T, A] (nn.GroupNorm wants channels in dim 1)."""
    B, T, A = x.shape
    return ln_x(x.reshape(B * T, A)).view(B, T, A)
