"""A fused one-token RWKV-7 step for batch-1 (and small-batch) decoding: `triton_fused.FusedStepV7`.

Its reference is the model's own RNN mode (`RWKV7.run_unchecked` at T == 1); `rwkvkit.runtime.Decoder` picks it
on CUDA (`fused="auto"`).
"""
