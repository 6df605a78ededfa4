"""Training data: RWKV-LM compatible binidx files, the `prepare` verb, chat templates and the batch readers.

Only numpy is imported here; torch is needed only by `Batch.to_torch`.
"""

from rwkvkit.data.binidx import BinIdxDataset, BinIdxWriter, token_dtype
from rwkvkit.data.chat import ChatTemplate
from rwkvkit.data.dataset import IGNORE_INDEX, Batch, Batcher, DocumentWindows, TokenWindows
from rwkvkit.data.sampler import SAMPLES_PER_EPOCH, WindowSampler, is_prime, magic_prime

__all__ = [
    "BinIdxDataset",
    "BinIdxWriter",
    "token_dtype",
    "ChatTemplate",
    "IGNORE_INDEX",
    "Batch",
    "Batcher",
    "DocumentWindows",
    "TokenWindows",
    "SAMPLES_PER_EPOCH",
    "WindowSampler",
    "is_prime",
    "magic_prime",
]
