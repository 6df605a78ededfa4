"""Training batches from binidx data, addressed by position so any step can be recomputed (and resumed).

Two sources, one interface (`batch(micro_step, rank) -> Batch`, `state()` fingerprint):

- `TokenWindows`: pretraining, RWKV-LM's order (magic_prime cube permutation over the flat token stream).
- `DocumentWindows`: fine-tuning, one document (or one ctx_len piece of a long one) per row, padded, with the
  loss mask of `prepare` (chat answers only) and a seeded shuffle per epoch.

`Batcher` walks a source from a saved position. `micro_step` counts micro-batches per rank since the start of the
run; with gradient accumulation A, optimizer step s is micro_steps s*A .. s*A + A - 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwkvkit.data.binidx import BinIdxDataset
from rwkvkit.data.sampler import WindowSampler
from rwkvkit.errors import ConfigError, DataError

IGNORE_INDEX = -100  # the targets value torch's cross_entropy skips by default


@dataclass
class Batch:
    """input_ids and targets are int64 [B, T]; loss_mask is float32 [B, T] (1 = trained) or None (all trained)."""

    input_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray | None = None

    def masked_targets(self) -> np.ndarray:
        """targets with IGNORE_INDEX where the loss mask is 0 (for cross_entropy(ignore_index=-100))."""
        if self.loss_mask is None:
            return self.targets
        return np.where(self.loss_mask > 0, self.targets, IGNORE_INDEX)

    def document_cu_seqlens(self) -> np.ndarray:
        """The rows cut into their documents, as `cu_seqlens` (int32 [N + 1]) of the B x T input tokens read as one
        row: a new sequence starts at each row's start and after each end token 0 (the end token itself ends its
        document). For `model(idx.view(1, -1), cu_seqlens=...)`: no state or token shift crosses a document start."""
        B, T = self.input_ids.shape
        rows, cols = np.nonzero(self.input_ids[:, :-1] == 0)
        starts = np.concatenate((np.arange(B) * T, rows * T + cols + 1))
        return np.append(np.sort(starts), B * T).astype(np.int32)

    def to_torch(self, device=None):
        """(input_ids, targets, loss_mask or None) as torch tensors."""
        import torch

        def t(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)

        return t(self.input_ids), t(self.targets), t(self.loss_mask)


def _open(data: BinIdxDataset | str | Path) -> BinIdxDataset:
    return data if isinstance(data, BinIdxDataset) else BinIdxDataset(data)


def _open_mask(data: BinIdxDataset, mask) -> BinIdxDataset | None:
    """mask: "auto" (PREFIX.mask next to the data, if there), None, a prefix or a dataset."""
    if mask == "auto":
        prefix = str(data.bin_path.with_suffix("")) + ".mask"
        if data.bin_path.suffix != ".bin" or not Path(prefix + ".idx").is_file():
            return None
        mask = prefix
    if mask is None:
        return None
    mask = _open(mask)
    if mask.num_tokens != data.num_tokens:
        raise DataError(f"{mask.bin_path}: {mask.num_tokens} mask values for {data.num_tokens} tokens")
    return mask


class TokenWindows:
    """RWKV-LM pretraining windows: row j of micro-batch `micro_step` on `rank` reads ctx_len + 1 tokens of the
    flat stream from `sampler.window_start(...)`; x = window[:-1], y = window[1:]."""

    def __init__(self, data, ctx_len: int, micro_bsz: int = 1, world_size: int = 1,
                 magic_prime: int | None = None, epoch_begin: int = 0, mask=None):
        self.data = _open(data)
        self.mask = _open_mask(self.data, mask)
        self.ctx_len = ctx_len
        self.micro_bsz = micro_bsz
        self.world_size = world_size
        self.sampler = WindowSampler(self.data.num_tokens, ctx_len, micro_bsz, world_size, magic_prime, epoch_begin)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def sample_window(self, micro_step: int, j: int = 0, rank: int = 0):
        """(input_ids [ctx_len], targets [ctx_len]) as int64 for one row."""
        start = self.sampler.window_start(micro_step, j, rank)
        w = self.data.get(start, self.ctx_len + 1).astype(np.int64)
        return w[:-1], w[1:]

    def batch(self, micro_step: int, rank: int = 0) -> Batch:
        self._check_rank(rank)
        starts = self.sampler.batch_starts(micro_step, rank)
        T = self.ctx_len
        windows = np.stack([self.data.get(s, T + 1) for s in starts]).astype(np.int64)
        mask = None
        if self.mask is not None:
            mask = np.stack([self.mask.get(s + 1, T) for s in starts]).astype(np.float32)
        return Batch(windows[:, :-1], windows[:, 1:], mask)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank} is outside world_size {self.world_size}")

    def state(self) -> dict:
        """What a saved position is only valid for."""
        return {"mode": "windows", "tokens": self.data.num_tokens, "ctx_len": self.ctx_len,
                "micro_bsz": self.micro_bsz, "world_size": self.world_size,
                "magic_prime": self.sampler.magic_prime, "epoch_begin": self.sampler.epoch_begin}


class DocumentWindows:
    """Fine-tuning rows aligned to documents. A document of n tokens (its end token 0 included) gives
    ceil((n-1)/ctx_len) rows: inputs doc[o : o+ctx_len], targets doc[o+1 : o+ctx_len+1] for o = 0, ctx_len, ...
    Rows are padded with token 0 and loss mask 0; the mask is also 0 wherever `prepare`'s mask says not to train.
    Each epoch visits all rows in a permutation seeded by (seed, epoch); the last incomplete global batch is dropped.
    """

    def __init__(self, data, ctx_len: int, micro_bsz: int = 1, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, mask="auto"):
        self.data = _open(data)
        self.mask = _open_mask(self.data, mask)
        self.ctx_len, self.micro_bsz, self.world_size = ctx_len, micro_bsz, world_size
        self.seed, self.shuffle = seed, shuffle
        starts, ends = self.data.document_spans()
        n_targets = ends - starts - 1
        keep = n_targets > 0
        pieces = -(-n_targets[keep] // ctx_len)  # ceil
        doc_start, doc_end = starts[keep], ends[keep]
        first_piece = np.repeat(np.cumsum(pieces) - pieces, pieces)
        self.row_start = np.repeat(doc_start, pieces) + (np.arange(int(pieces.sum())) - first_piece) * ctx_len
        self.row_doc_end = np.repeat(doc_end, pieces)
        rows_per_step = micro_bsz * world_size
        self.steps_per_epoch = len(self.row_start) // rows_per_step
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.row_start)} rows of documents are fewer than micro_bsz * world_size = "
                            f"{rows_per_step}: use a smaller batch or more data")
        self._perm_epoch, self._perm = -1, None

    @property
    def num_rows(self) -> int:
        return len(self.row_start)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = self.num_rows
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def row(self, micro_step: int, j: int = 0, rank: int = 0) -> int:
        """The row read by row j of micro-batch `micro_step` on `rank` (laid out like RWKV-LM: idx*world + rank)."""
        epoch, step = divmod(micro_step, self.steps_per_epoch)
        k = (step * self.micro_bsz + j) * self.world_size + rank
        return int(self._order(epoch)[k])

    def sample_window(self, micro_step: int, j: int = 0, rank: int = 0):
        """(input_ids [ctx_len], targets [ctx_len], loss_mask [ctx_len]) for one row."""
        T = self.ctx_len
        r = self.row(micro_step, j, rank)
        start, end = int(self.row_start[r]), int(self.row_doc_end[r])
        w = np.zeros(T + 1, dtype=np.int64)
        n = min(T + 1, end - start)
        w[:n] = self.data.get(start, n)
        m = np.zeros(T, dtype=np.float32)
        m[: n - 1] = 1.0 if self.mask is None else self.mask.get(start + 1, n - 1)
        return w[:-1], w[1:], m

    def batch(self, micro_step: int, rank: int = 0) -> Batch:
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank} is outside world_size {self.world_size}")
        rows = [self.sample_window(micro_step, j, rank) for j in range(self.micro_bsz)]
        return Batch(*(np.stack(parts) for parts in zip(*rows)))

    def state(self) -> dict:
        return {"mode": "documents", "tokens": self.data.num_tokens, "rows": self.num_rows,
                "ctx_len": self.ctx_len, "micro_bsz": self.micro_bsz, "world_size": self.world_size,
                "seed": self.seed, "shuffle": self.shuffle}


class Batcher:
    """Iterates `source.batch(micro_step, rank)` from a saved position, forever (the trainer decides when to stop).

    `state_dict()` -> {"micro_step": next position, "source": fingerprint}; `load_state_dict` refuses a position
    saved for other data or another batch geometry, since it would not name the same samples.
    """

    def __init__(self, source: TokenWindows | DocumentWindows, rank: int = 0, micro_step: int = 0):
        self.source, self.rank, self.micro_step = source, rank, micro_step

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch = self.source.batch(self.micro_step, self.rank)
        self.micro_step += 1
        return batch

    def state_dict(self) -> dict:
        return {"micro_step": self.micro_step, "source": self.source.state()}

    def load_state_dict(self, state: dict) -> None:
        saved, now = state["source"], self.source.state()
        if saved != now:
            diff = ", ".join(f"{k}: {saved.get(k)} -> {now.get(k)}" for k in sorted(set(saved) | set(now))
                             if saved.get(k) != now.get(k))
            raise ConfigError(f"cannot resume the data position: it was saved for different data or batch "
                              f"geometry ({diff})")
        self.micro_step = int(state["micro_step"])

