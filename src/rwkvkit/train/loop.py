"""The one training loop (pretraining now; fine-tuning plugs into the same loop).

Extension points, so fine-tuning needs no second loop:
- what trains: freeze parameters (`requires_grad=False`) or add adapter / initial-state parameters to the model
  before `Trainer` is built; the optimizer only ever sees trainable parameters, grouped by name (`optim.py`);
- what the loss is: `objective` is any module `(batch) -> scalar loss`; `LMObjective` handles masks, and a
  long-context objective can run chunks with a carried state inside its forward;
- where batches come from: any `rwkvkit.data` source (`batch(micro_step, rank) -> Batch`).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rwkvkit.errors import ConfigError, DataError, RwkvkitError
from rwkvkit.train import checkpoint as ckpt
from rwkvkit.train import parallel
from rwkvkit.train.config import PretrainConfig
from rwkvkit.train.data import num_tokens
from rwkvkit.train.loss import lm_loss
from rwkvkit.train.metrics import MetricsLogger, truncate_metrics
from rwkvkit.train.optim import build_optimizer, set_lr
from rwkvkit.train.schedule import lr_at

CHECKPOINT_FORMAT = "rwkvkit-train/1"

# dense bf16 peak FLOP/s of common training GPUs (for MFU); matched against torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A800": 312e12, "H800": 989e12,
                   "L40S": 362e12, "4090": 165e12, "3090": 71e12, "A6000": 155e12, "B200": 2250e12}


class TrainingDiverged(RwkvkitError):
    """The loss or the gradient norm became NaN/inf."""


class LMObjective(nn.Module):
    """Mean next-token cross-entropy (+ L2Wrap) of a model, with optional per-token masks.

    Holding the model makes this the module DDP/FSDP wrap: their hooks see the whole forward pass.
    """

    def __init__(self, model: nn.Module, head_chunk: int = 4096, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.head_chunk = head_chunk
        self.compute_dtype = compute_dtype

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """cu_seqlens: the B x T tokens read as one row of packed sequences (`Batch.document_cu_seqlens`)."""
        if cu_seqlens is not None:
            hidden, _ = self.model.hidden(idx.reshape(1, -1), cu_seqlens=cu_seqlens)
            hidden = hidden.view(*idx.shape, -1)
        else:
            hidden, _ = self.model.hidden(idx)
        return lm_loss(hidden, self.model.head.weight, targets, mask, chunk=self.head_chunk,
                       compute_dtype=self.compute_dtype)


class _StopOnInterrupt:
    """While training: Ctrl-C (SIGINT) or SIGTERM (what schedulers send before they preempt a job) asks the trainer
    to finish the current step, save a checkpoint and stop; a second signal at least a second later interrupts at
    once. (torchrun forwards the terminal's SIGINT to workers that already got it, so a repeat within the second is
    the same keypress.) Only where Python delivers signals (the main thread). The handler only sets flags: the
    training loop does the logging."""

    REPEAT_AFTER_S = 1.0
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested_at: float | None = None
        self.announced = False
        self.previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _on_signal(self, signum, frame):
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at = now
        elif now - self.requested_at >= self.REPEAT_AFTER_S:
            self.restore()
            raise KeyboardInterrupt

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def write_recipe(path: Path, cfg: PretrainConfig) -> None:
    """The run's full config as a recipe: `rwkvkit pretrain --config RUN/config.yaml` repeats the run."""
    import yaml

    d = cfg.to_dict()
    d["run"]["resume"] = "auto"
    ckpt.atomic_write(path, lambda f: yaml.safe_dump(d, f, sort_keys=False), mode="w")


def matmul_flops_per_token(model: nn.Module) -> float:
    """6 x the parameters that take part in matmuls (everything but the embedding lookup): forward + backward."""
    return 6.0 * (sum(p.numel() for p in model.parameters()) - model.emb.weight.numel())


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    def __init__(self, cfg: PretrainConfig, model: nn.Module, data, info: parallel.DistInfo,
                 objective: nn.Module | None = None, model_config: dict | None = None):
        self.cfg, self.model, self.data, self.info = cfg, model, data, info
        t = cfg.train
        self.out_dir = Path(cfg.run.out_dir)
        self.model_config = model_config or {}
        self.tokens_per_step = cfg.data.ctx_len * t.micro_bsz * info.world_size * t.accumulate
        self.exit_tokens = t.exit_tokens or num_tokens(data)
        self.total_steps = math.ceil(self.exit_tokens / self.tokens_per_step)
        dev = info.device
        precision = t.precision if t.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
            torch.backends.cudnn.allow_tf32 = precision != "fp32"
        self.autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16"
                         else contextlib.nullcontext())
        compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

        self.step, self.epoch_loss = 0, [0.0, 0]
        payload = ckpt.find_resume(self.out_dir, cfg.run.resume)
        if payload is None and ckpt.list_checkpoints(self.out_dir):
            raise ckpt.CheckpointError(
                f"{self.out_dir} already holds checkpoints of another run; continue it with --run.resume auto or "
                "choose a new --run.out_dir")
        if payload is not None:
            self._check_compatible(payload)
            model.load_state_dict(payload["model"])
        model.to(dev)
        model.train()
        parallel.freeze_unused(model)
        if t.compile:
            model.compile_blocks(t.compile_mode, memory_budget=t.compile_memory_budget)
        elif t.compile_memory_budget != 1.0:
            raise ConfigError("--train.compile_memory_budget applies to compiled blocks: add --train.compile true")
        if t.grad_cp:
            parallel.checkpoint_blocks(model)
        parallel.add_dropout(model, t.dropout)
        objective = objective or LMObjective(model, t.head_chunk, compute_dtype)
        self.objective = parallel.wrap(objective.to(dev), model, t.parallel, info)
        self.fsdp = parallel.is_fsdp(self.objective)
        o = cfg.optim
        self.optimizer = build_optimizer(model.named_parameters(), lr=o.lr_init, betas=(o.beta1, o.beta2),
                                         eps=o.adam_eps, weight_decay=o.weight_decay)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if payload is not None:
            self._restore(payload)
        self.flops_per_token = matmul_flops_per_token(model)
        self.peak = peak_flops(dev)
        self.resumed_from = payload["step"] if payload is not None else None

    # ------------------------------------------------------------------ checkpoints

    def _check_compatible(self, payload: dict) -> None:
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ckpt.CheckpointError(f"unknown checkpoint format {payload.get('format')!r}")
        if self.model_config and payload.get("model_config") not in (None, self.model_config):
            raise ckpt.CheckpointError(
                f"the checkpoint in {self.out_dir} is of another model ({payload['model_config']}); "
                f"use a new --run.out_dir or --run.resume none")
        old_rows = payload["samples_per_micro_step"]
        rows = self.cfg.train.micro_bsz * self.info.world_size
        if old_rows != rows:
            raise ckpt.CheckpointError(
                f"the checkpoint was written with micro_bsz x processes = {old_rows}, this run has {rows}: "
                "resume with the same batch layout")

    def _restore(self, payload: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, payload["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(payload["optimizer"])
        self.step = payload["step"]
        self.epoch_loss = list(payload["epoch_loss"])
        rngs = payload["rng"]
        if self.info.rank < len(rngs):
            set_rng_state(rngs[self.info.rank], self.info.device)

    def _model_state(self) -> dict:
        """The unsharded state dict (a collective under FSDP)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.model, options=opts)
        return self.model.state_dict()

    def _optimizer_state(self) -> dict:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        return self.optimizer.state_dict()

    def save(self) -> Path | None:
        model_sd, optim_sd = self._model_state(), self._optimizer_state()
        rngs = [rng_state(self.info.device)]
        if self.info.distributed:
            import torch.distributed as dist

            rngs = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng_state(self.info.device))
        path = None
        if self.info.is_main:
            payload = {
                "format": CHECKPOINT_FORMAT, "step": self.step, "tokens": self.step * self.tokens_per_step,
                "micro_step": self.step * self.cfg.train.accumulate,
                "samples_per_micro_step": self.cfg.train.micro_bsz * self.info.world_size,
                "model": model_sd, "optimizer": optim_sd, "rng": rngs, "epoch_loss": self.epoch_loss,
                "config": self.cfg.to_dict(), "model_config": self.model_config,
            }
            path = ckpt.save_checkpoint(payload, self.out_dir, self.step, self.cfg.run.keep_checkpoints)
        self._barrier()
        return path

    def export(self, name: str) -> None:
        """Weights only, as official `name.pth` and an HF-style `name/` folder (safetensors)."""
        model_sd = self._model_state()
        if self.info.is_main:
            ckpt.export_weights(model_sd, self.out_dir, name, self.model_config)
        self._barrier()

    def _barrier(self) -> None:
        if self.info.distributed:
            import torch.distributed as dist

            dist.barrier()

    # ------------------------------------------------------------------ training

    def _micro_batch(self, micro_step: int, last: bool) -> torch.Tensor:
        batch = self.data.batch(micro_step, self.info.rank)
        # checked here, on the host copy: on a GPU a bad id would only surface as a device-side assertion
        top = int(max(batch.input_ids.max(), batch.targets.max()))
        if top >= self.model.config.vocab_size:
            raise DataError(f"micro-step {micro_step}: the data holds token id {top} but the model's vocab_size "
                            f"is {self.model.config.vocab_size}")
        idx, targets, mask = batch.to_torch(self.info.device)
        # from the host: the kernels then get exact grids (docs/gpu.md, packed sequences)
        cu = torch.from_numpy(batch.document_cu_seqlens()) if self.cfg.data.separate_documents else None
        sync = contextlib.nullcontext()
        if not last and isinstance(self.objective, nn.parallel.DistributedDataParallel):
            sync = self.objective.no_sync()  # all-reduce gradients once per optimizer step
        elif self.fsdp:
            self.objective.set_requires_gradient_sync(last)
        with sync:
            with self.autocast:
                loss = self.objective(idx, targets, mask, cu_seqlens=cu)
            (loss / self.cfg.train.accumulate).backward()
        return loss.detach().float()

    def _clip(self) -> torch.Tensor:
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        acc = cfg.train.accumulate
        samples_per_step = cfg.train.micro_bsz * info.world_size * acc
        log = None
        if info.is_main:
            truncate_metrics(self.out_dir, self.step)  # drop what a killed run logged after its last checkpoint
            write_recipe(self.out_dir / "config.yaml", cfg)
            log = MetricsLogger(self.out_dir, total_steps=self.total_steps, log_every=cfg.run.log_every,
                                logger=cfg.run.logger, progress_bar=cfg.run.progress_bar, config=cfg.to_dict(),
                                wandb_project=cfg.run.wandb_project)
            log.start(self.step)
            if self.resumed_from is not None:
                log.message(f"resumed from step {self.step} ({self.step * self.tokens_per_step} tokens)")
        last_good = ckpt.list_checkpoints(self.out_dir)
        o = cfg.optim
        stop = _StopOnInterrupt()
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                lr = lr_at(self.step, tokens_per_step=self.tokens_per_step, exit_tokens=self.exit_tokens,
                           lr_init=o.lr_init, lr_final=o.lr_final, warmup_steps=o.warmup_steps)
                set_lr(self.optimizer, lr)
                loss = sum(self._micro_batch(self.step * acc + a, a == acc - 1) for a in range(acc)) / acc
                grad_norm = self._clip()
                if stop.requested and not stop.announced and log:
                    log.message("interrupt: saving a checkpoint after this step (Ctrl-C again to stop now)")
                    stop.announced = True
                # one all-reduce carries the stop request too, so that every rank stops after the same step
                flag = torch.tensor(float(stop.requested), device=loss.device)
                stats = parallel.all_mean(torch.stack([loss, grad_norm.float().to(loss.device), flag]), info)
                loss_v, norm_v, stop_v = stats.tolist()
                if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
                    what = "loss" if not math.isfinite(loss_v) else "gradient norm"
                    where = f"the last good checkpoint is {last_good[-1]}" if last_good else "no checkpoint was written"
                    raise TrainingDiverged(
                        f"{what} is {loss_v if what == 'loss' else norm_v} at step {self.step + 1}; stopped before "
                        f"updating the weights ({where}); try a lower --optim.lr_init or --optim.grad_clip")
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if info.device.type == "cuda":
                    torch.cuda.synchronize(info.device)
                dt = time.perf_counter() - t0
                tps = self.tokens_per_step / dt
                rec = {"step": self.step, "tokens": self.step * self.tokens_per_step, "loss": loss_v, "lr": lr,
                       "grad_norm": norm_v, "tokens_per_s": tps, "step_time": dt}
                if self.peak:
                    rec["mfu"] = tps * self.flops_per_token / (self.peak * info.world_size)
                if log:
                    log.log_step(rec)
                self.epoch_loss = [self.epoch_loss[0] + loss_v, self.epoch_loss[1] + 1]
                epoch_done = self.step * samples_per_step // cfg.run.epoch_samples
                if epoch_done > (self.step - 1) * samples_per_step // cfg.run.epoch_samples:
                    self._end_mini_epoch(epoch_done - 1, lr, log)
                regular = self.step < self.total_steps and cfg.run.save_every and self.step % cfg.run.save_every == 0
                if regular:
                    last_good = [self.save()]
                if stop_v > 0 and self.step < self.total_steps:
                    # every rank decides alike (the flag was all-reduced), so the collective save stays matched
                    path = last_good[-1] if regular else self.save()
                    if log:
                        log.message(f"interrupted after step {self.step}: checkpoint {path}; continue with "
                                    f"--run.resume auto")
                    raise KeyboardInterrupt
            final = self.save()
            self.export("rwkv-final")
            if log:
                log.message(f"done: {self.step} steps, {self.step * self.tokens_per_step} tokens; "
                            f"checkpoint {final}; weights {self.out_dir / 'rwkv-final.pth'}")
        finally:
            stop.restore()
            if log:
                log.close()
        if info.is_main:
            from rwkvkit.train.plot import plot_run

            plot_run(self.out_dir)
        return {"step": self.step, "tokens": self.step * self.tokens_per_step}

    def _end_mini_epoch(self, epoch: int, lr: float, log: MetricsLogger | None) -> None:
        total, count = self.epoch_loss
        if log and count:
            log.mini_epoch(epoch, total / count, lr)
        self.epoch_loss = [0.0, 0]
        every = self.cfg.run.export_every_epochs
        if every and epoch % every == 0:
            self.export(f"rwkv-{epoch}")
