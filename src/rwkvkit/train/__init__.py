"""Training: typed configs (`config`), the one loop (`loop.Trainer`), fused loss + L2Wrap (`loss`), parameter
groups (`optim`), the LR schedule (`schedule`), atomic checkpoints and exports (`checkpoint`), metrics/plots,
DDP/FSDP2 wrapping (`parallel`), and the `pretrain` / `estimate` / `plot` verbs. See docs/pretrain.md."""
