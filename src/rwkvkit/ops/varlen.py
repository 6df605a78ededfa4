"""Variable-length packed sequences for the WKV ops (`cu_seqlens`, as in flash-attn and fla).

Several independent sequences are concatenated along T into one [1, T_total, H, N] batch row; cu_seqlens [N + 1]
(integer, starting at 0, non-decreasing, ending at T_total) marks where each starts. Every sequence starts from its
own initial state (or zeros) and ends in its own final state, both [N, H, ...]; nothing flows across a boundary.
This is how packed training batches and a server's batched prefill avoid padding.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, NamedTuple

import torch


def cu_seqlens_of(lengths) -> torch.Tensor:
    """cu_seqlens (int32 [N + 1], on the CPU) for sequences of these lengths packed in order."""
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)


def check_cu_seqlens(cu_seqlens: torch.Tensor, x: torch.Tensor, initial_state: torch.Tensor | None) -> int:
    """The number of sequences, after checking cu_seqlens against the packed input x [1, T_total, H, N] and the
    optional initial state [N, H, ...]. Values are checked only for CPU tensors (on the GPU a check waits for it)
    and not while torch.compile traces (reading them would split the graph there; the models check them before
    their compiled blocks)."""
    from rwkvkit.errors import ConfigError

    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ConfigError(f"cu_seqlens must be a 1-D integer tensor of sequence starts plus the end (N + 1 >= 2 "
                          f"entries), got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    if x.shape[0] != 1:
        raise ConfigError(f"packed sequences (cu_seqlens) take one batch row [1, T_total, H, N], got {tuple(x.shape)}")
    n = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape[0] != n:
        raise ConfigError(f"initial_state needs one state per sequence ({n}), got {tuple(initial_state.shape)}")
    if not cu_seqlens.is_cuda and not torch.compiler.is_compiling():
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != x.shape[1] or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ConfigError(f"cu_seqlens must run from 0 to T_total = {x.shape[1]} without decreasing, "
                              f"got {cu_seqlens.tolist()}")
    return n


def per_sequence(
    fn: Callable, cu_seqlens: torch.Tensor, tokens: tuple[torch.Tensor, ...], initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Any packed call, one sequence at a time: fn(*token_slices, state) on each sequence alone, outputs
    concatenated along T and final states stacked. tokens are [1, T_total, H, N] tensors."""
    bounds = cu_seqlens.tolist()
    ys, finals = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        s0 = None if initial_state is None else initial_state[i : i + 1]
        y, s = fn(*(x[:, start:end] for x in tokens), s0)
        ys.append(y)
        finals.append(s)
    return torch.cat(ys, 1), torch.cat(finals, 0)


class ChunkMap(NamedTuple):
    """Where the kernels find each packed sequence and each C-token chunk, as int32 rows of four (one 16-byte load).

    seq_table[n] = (first token, length, first chunk, 0) of sequence n, whose chunk c (of cdiv(length, C)) has the
    flat index first chunk + c; chunk_table[i] = (c, first token, length, first chunk) of the sequence flat chunk i
    belongs to. Built from CPU cu_seqlens, the table has exactly the chunks there are; from GPU ones (counting them
    would wait for the GPU), `chunk_bound` rows, the spare ones with c = -1."""

    seq_table: torch.Tensor  # [N, 4] int32
    chunk_table: torch.Tensor  # [n_chunks, 4] int32
    n_seqs: int
    n_chunks: int


def chunk_bound(total: int, n_seqs: int, C: int) -> int:
    """At least sum_n cdiv(length_n, C) for any n_seqs lengths summing to total: each adds under one chunk."""
    return total // C + n_seqs


_MAPS: OrderedDict = OrderedDict()  # the last few maps: every layer of a model, forward and backward, asks again


def chunk_map(cu_seqlens: torch.Tensor, total: int, C: int, device: torch.device) -> ChunkMap:
    """The map for C-token chunks of sequences packed into total tokens (the input's T, not read from cu_seqlens),
    on `device`. The last few are kept, keyed by the cu_seqlens tensor itself (held, so its id stays its own) and its
    version (an in-place change makes a new map)."""
    key = (id(cu_seqlens), cu_seqlens._version, total, C, str(device))
    if key in _MAPS:
        _MAPS.move_to_end(key)
        return _MAPS[key][1]
    found = _build_map(cu_seqlens, total, C, device)
    _MAPS[key] = (cu_seqlens, found)
    while len(_MAPS) > 8:
        _MAPS.popitem(last=False)
    return found


def counting_is_free(cu_seqlens: torch.Tensor) -> bool:
    """Whether the chunks can be counted without waiting for the GPU (tests force the bound to cover it)."""
    return not cu_seqlens.is_cuda


def _build_map(cu_seqlens: torch.Tensor, total: int, C: int, device: torch.device) -> ChunkMap:
    cu = cu_seqlens.long()
    n = cu.numel() - 1
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    counts = torch.div(lengths + C - 1, C, rounding_mode="floor")
    ends = counts.cumsum(0)
    first = ends - counts
    rows = int(ends[-1]) if counting_is_free(cu) else chunk_bound(total, n, C)
    seq = torch.searchsorted(ends, torch.arange(rows, device=cu.device), right=True)
    spare = seq >= n
    seq = seq.clamp(max=n - 1)
    within = torch.where(spare, -1, torch.arange(rows, device=cu.device) - first[seq])
    seq_table = torch.stack([starts, lengths, first, torch.zeros_like(first)], 1)
    chunk_table = torch.stack([within, starts[seq], lengths[seq], first[seq]], 1)
    to = dict(device=device, dtype=torch.int32, non_blocking=True)
    return ChunkMap(seq_table.to(**to), chunk_table.to(**to), n, rows)
