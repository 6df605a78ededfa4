"""`rwkvkit plot RUN_DIR`: the loss curve (raw and smoothed) and the learning rate of a run, as a PNG."""

from __future__ import annotations

import sys
from pathlib import Path

from rwkvkit.errors import ConfigError
from rwkvkit.train.metrics import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/loss.png (or `out`) from RUN_DIR/metrics.jsonl; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
    if not recs:
        raise ConfigError(f"{run_dir}: no metrics.jsonl records to plot (is it a `rwkvkit pretrain` run folder?)")
    tokens = [r["tokens"] for r in recs]
    loss = [r["loss"] for r in recs]
    # exponential moving average with a window of ~2% of the run: readable trend without hiding the start
    alpha = min(1.0, 50.0 / len(loss))
    smooth, avg = [], loss[0]
    for v in loss:
        avg = alpha * v + (1 - alpha) * avg
        smooth.append(avg)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(tokens, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    ax.plot(tokens, smooth, color="tab:blue", linewidth=1.8, label="loss (smoothed)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(tokens, [r["lr"] for r in recs], color="tab:orange", linewidth=1.0, label="lr")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(f"{run_dir.name}: final loss {smooth[-1]:.3f} after {recs[-1]['step']} steps")
    ax.legend(loc="upper right")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import CLI

    def plot(run_dir: str, out: str | None = None) -> None:
        """Plot a run's loss curve.

        Args:
            run_dir: the run folder (`--run.out_dir` of `rwkvkit pretrain`), holding metrics.jsonl.
            out: the PNG to write (default RUN_DIR/loss.png).
        """
        print(plot_run(run_dir, out))

    CLI(plot, args=sys.argv[1:] if argv is None else argv, as_positional=True, prog="rwkvkit plot")
    return 0
