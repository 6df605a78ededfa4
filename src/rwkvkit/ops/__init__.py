"""The WKV recurrences of RWKV v4, v5/v6 and v7 (layouts and signatures: docs/design.md).

    from rwkvkit.ops.wkv4 import wkv4
    from rwkvkit.ops.wkv6 import wkv6   # also RWKV-5, with a time-constant decay
    from rwkvkit.ops.wkv7 import wkv7

Each subpackage holds naive.py (the per-step ground truth), chunked.py (fast pure PyTorch, and the T == 1 step)
and, for v6/v7, the GPU kernels; its `__init__` dispatches on `impl`. The functions are deliberately not
re-exported here: a function named like its subpackage would shadow it (`import rwkvkit.ops.wkv7 as m` would
then give the function).
"""
