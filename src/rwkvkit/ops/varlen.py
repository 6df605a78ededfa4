"""Variable-length packed sequences for the WKV ops (`cu_seqlens`, as in flash-attn and fla).

Several independent sequences are concatenated along T into one [1, T_total, H, N] batch row; cu_seqlens [N + 1]
(integer, starting at 0, non-decreasing, ending at T_total) marks where each starts. Every sequence starts from its
own initial state (or zeros) and ends in its own final state, both [N, H, ...]; nothing flows across a boundary.
This is how packed training batches and a server's batched prefill avoid padding.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor, x: torch.Tensor, initial_state: torch.Tensor | None) -> int:
    """The number of sequences, after checking cu_seqlens against the packed input x [1, T_total, H, N] and the
    optional initial state [N, H, ...]. Values are checked only for CPU tensors: on the GPU a check waits for it."""
    from rwkvkit.errors import ConfigError

    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ConfigError(f"cu_seqlens must be a 1-D integer tensor of sequence starts plus the end (N + 1 >= 2 "
                          f"entries), got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    if x.shape[0] != 1:
        raise ConfigError(f"packed sequences (cu_seqlens) take one batch row [1, T_total, H, N], got {tuple(x.shape)}")
    n = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape[0] != n:
        raise ConfigError(f"initial_state needs one state per sequence ({n}), got {tuple(initial_state.shape)}")
    if not cu_seqlens.is_cuda:
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
    """Where the kernels find each sequence's C-token chunks, built on the device without waiting for it.

    Chunk c of sequence n (of cdiv(length_n, C)) has the flat index first_chunk[n] + c; chunk_seq[i] is the
    sequence of flat chunk i, or -1 for the spare entries past the last chunk: the kernels' grids are sized by
    `chunk_bound` (known from the shapes) rather than the exact count (which would wait for the GPU)."""

    cu_seqlens: torch.Tensor  # [N + 1] int32
    first_chunk: torch.Tensor  # [N] int32
    chunk_seq: torch.Tensor  # [chunk_bound] int32
    n_seqs: int
    n_chunks: int  # chunk_bound: a bound of the flat chunk count


def chunk_bound(total: int, n_seqs: int, C: int) -> int:
    """At least sum_n cdiv(length_n, C) for any n_seqs lengths summing to total: each adds under one chunk."""
    return total // C + n_seqs


def chunk_map(cu_seqlens: torch.Tensor, total: int, C: int) -> ChunkMap:
    """The map for C-token chunks of sequences packed into total tokens (the input's T, not read from cu_seqlens)."""
    cu = cu_seqlens.to(torch.int32)
    n = cu.numel() - 1
    counts = torch.div(cu[1:] - cu[:-1] + C - 1, C, rounding_mode="floor")
    ends = counts.cumsum(0)
    bound = chunk_bound(total, n, C)
    seq = torch.searchsorted(ends, torch.arange(bound, device=cu.device, dtype=ends.dtype), right=True)
    seq = torch.where(seq < n, seq, -1).to(torch.int32)
    return ChunkMap(cu, (ends - counts).to(torch.int32), seq, n, bound)

