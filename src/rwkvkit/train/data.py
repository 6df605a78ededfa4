"""Opening the training data. Batch sources come from `rwkvkit.data` (see docs/prepare.md, "Reader API"): any
object with `batch(micro_step, rank) -> Batch` works, so the data position saved in a checkpoint is one integer
and a resumed run reads exactly the batches the interrupted one would have read. Pretraining uses
`TokenWindows` (RWKV-LM's magic-prime order); fine-tuning can pass `DocumentWindows` (masked, one document per row).
"""

from __future__ import annotations

import numpy as np

from rwkvkit.errors import DataError


def open_pretrain_data(data_file: str, ctx_len: int, micro_bsz: int, world_size: int = 1,
                       magic_prime: int | None = None, vocab_size: int | None = None):
    from rwkvkit.data import TokenWindows

    if not data_file:
        raise DataError("no training data: pass --data.data_file PREFIX (a binidx pair from `rwkvkit prepare`)")
    source = TokenWindows(data_file, ctx_len, micro_bsz, world_size, magic_prime)
    n = source.data.num_tokens
    if vocab_size is not None and n:
        # a cheap look at a prefix catches the classic mistake of a NeoX-tokenized file for a World model
        top = int(np.max(source.data.get(0, min(n, 1 << 20))))
        if top >= vocab_size:
            raise DataError(f"{data_file} holds token id {top} but the model's vocab_size is {vocab_size}")
    return source


def num_tokens(source) -> int:
    """Tokens in a source's data (RWKV-LM's my_exit_tokens default)."""
    return int(source.data.num_tokens)
