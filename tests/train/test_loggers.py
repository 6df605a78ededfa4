"""The optional metric loggers: TensorBoard writes real event files; W&B gets init/log/finish calls (a stand-in
module, since W&B needs an account and the network)."""

import sys
import types

import pytest

from rwkvkit.train.metrics import MetricsLogger

RECORDS = [{"step": s, "tokens": 64 * s, "loss": 5.0 / s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0}
           for s in (1, 2, 3)]


def test_tensorboard_logger_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, total_steps=3, log_every=1, logger="tensorboard")
    for rec in RECORDS:
        logger.log_step(rec)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([5.0, 2.5, 5.0 / 3])
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3


def test_wandb_logger_gets_every_step(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(log=lambda data, step: calls.append(("log", step, data["loss"])),
                                finish=lambda: calls.append(("finish",)))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw["project"])) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = MetricsLogger(tmp_path, total_steps=3, log_every=1, logger="wandb", wandb_project="proj")
    for rec in RECORDS:
        logger.log_step(rec)
    logger.close()
    assert calls == [("init", "proj"), ("log", 1, 5.0), ("log", 2, 2.5), ("log", 3, 5.0 / 3), ("finish",)]


def test_missing_logger_package_is_a_clear_error(tmp_path, monkeypatch):
    from rwkvkit.errors import ConfigError

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match="pip install wandb"):
        MetricsLogger(tmp_path, total_steps=1, log_every=1, logger="wandb")
