"""Run metrics: `metrics.jsonl` (one record per optimizer step, always), a printed line per log interval (or a
tqdm bar), RWKV-LM's `train_log.txt` (one line per mini-epoch), and optional TensorBoard / W&B."""

from __future__ import annotations

import datetime
import json
import math
import sys
from pathlib import Path

from rwkvkit.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
TRAIN_LOG = "train_log.txt"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            break
    return records


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """On resume: drop the records a killed run wrote after the checkpoint it is resumed from."""
    from rwkvkit.train.checkpoint import atomic_write

    kept = [r for r in read_metrics(run_dir) if r["step"] <= last_step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    atomic_write(Path(run_dir) / METRICS_FILE, lambda f: f.write(text), mode="w")


def format_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


class MetricsLogger:
    """Only rank 0 creates one; other ranks log nothing."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, log_every: int, logger: str = "none",
                 progress_bar: bool = False, config: dict | None = None, wandb_project: str = "rwkvkit"):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_every = max(log_every, 1)
        self.total_steps = total_steps
        self.jsonl = open(self.dir / METRICS_FILE, "a")
        with open(self.dir / TRAIN_LOG, "a") as f:
            f.write(f"NEW RUN {datetime.datetime.now():%Y-%m-%d-%H-%M-%S}\n{json.dumps(config or {})}\n")
        self.bar = None
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, file=sys.stdout)
        self.tb = self.wandb = None
        if logger == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("--run.logger tensorboard needs `pip install tensorboard`") from e
            self.tb = SummaryWriter(str(self.dir / "tensorboard"))
        elif logger == "wandb":
            try:
                import wandb
            except ImportError as e:
                raise ConfigError("--run.logger wandb needs `pip install wandb`") from e
            self.wandb = wandb.init(project=wandb_project, name=self.dir.name, config=config, dir=str(self.dir),
                                    resume="allow")

    def start(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step)

    def log_step(self, rec: dict) -> None:
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        step = rec["step"]
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self.tb.add_scalar(f"train/{k}", rec[k], step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in rec.items() if k != "step"}, step=step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}",
                                 kts=f"{rec['tokens_per_s'] / 1e3:.1f}", refresh=False)
            self.bar.update(1)
        elif step % self.log_every == 0 or step == self.total_steps:
            line = (f"step {step}/{self.total_steps} | tokens {format_count(rec['tokens'])} | loss {rec['loss']:.4f}"
                    f" | lr {rec['lr']:.3e} | grad_norm {rec['grad_norm']:.3f}"
                    f" | {rec['tokens_per_s'] / 1e3:.2f} kt/s")
            if "mfu" in rec:
                line += f" | MFU {100 * rec['mfu']:.1f}%"
            print(line, flush=True)

    def mini_epoch(self, epoch: int, avg_loss: float, lr: float) -> None:
        """RWKV-LM's train_log.txt line: mini-epoch, average loss, perplexity, lr, time."""
        with open(self.dir / TRAIN_LOG, "a") as f:
            f.write(f"{epoch} {avg_loss:.6f} {math.exp(min(avg_loss, 700)):.4f} {lr:.8f} "
                    f"{datetime.datetime.now()} {epoch}\n")

    def message(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
