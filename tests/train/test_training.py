"""End-to-end training runs of a tiny RWKV-7 (L2 D64, ctx 32) on a synthetic corpus, on CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from train_helpers import PYTHON, config_args, deterministic_env, tiny_config
from rwkvkit.train import checkpoint as ckpt
from rwkvkit.train.metrics import read_metrics
from rwkvkit.train.pretrain import run

# First 8 per-step losses of `tiny_config(corpus, out)` (seed 42, fp32, CPU). They guard the whole recipe (init,
# sampler order, optimizer groups, schedule, loss): a change in any of them moves these numbers. If a change is
# intended, regenerate with
#   python -c "import sys; sys.path.insert(0, 'tests/train'); import train_helpers as h, tempfile, pathlib; \
#   from rwkvkit.train.pretrain import run; d = pathlib.Path(tempfile.mkdtemp()); \
#   run(h.tiny_config(h.write_corpus(d / 'toy'), d / 'out')); \
#   from rwkvkit.train.metrics import read_metrics; print([round(r['loss'], 4) for r in read_metrics(d / 'out')][:8])"
# and paste the list here (and say why in the commit message).
GOLDEN_LOSSES = [5.0224, 4.4376, 3.071, 2.6793, 2.7844, 2.6859, 2.53, 2.2537]


def losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir)]


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """One uninterrupted 12-step run, shared by the tests below."""
    out = tmp_path_factory.mktemp("ref")
    run(tiny_config(corpus, out))
    return out


def test_short_run_lowers_the_loss(reference_run):
    ls = losses(reference_run)
    assert len(ls) == 12
    assert ls[0] > 4.0  # about ln(128) at the official init
    assert sum(ls[-3:]) / 3 < ls[0] - 1.5
    assert (reference_run / "loss.png").stat().st_size > 10_000
    log = (reference_run / "train_log.txt").read_text()
    assert log.startswith("NEW RUN")


def test_golden_loss_curve(reference_run):
    got = [round(v, 4) for v in losses(reference_run)[:8]]
    if GOLDEN_LOSSES is None:
        pytest.fail(f"GOLDEN_LOSSES not set; this run gives {got}")
    assert got == pytest.approx(GOLDEN_LOSSES, abs=2e-3)


def test_kill_and_resume_gives_the_same_losses(corpus, tmp_path):
    env = deterministic_env()

    def command(out):
        cfg = tiny_config(corpus, out)
        cfg.run.save_every = 2
        return [PYTHON, "-m", "rwkvkit", "pretrain", *config_args(cfg)]

    subprocess.run(command(tmp_path / "whole"), env=env, check=True, capture_output=True, timeout=120)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            if len(read_metrics(out)) >= 7:  # past the step-6 checkpoint, mid-way to the next one
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(read_metrics(out)) < 12 and ckpt.list_checkpoints(out)
    resumed = subprocess.run(command(out) + ["--run.resume", "auto"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stdout
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 13))
    # bitwise: same weights, optimizer moments, schedule position and data order after the resume
    assert losses(out) == losses(tmp_path / "whole")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_saves_a_checkpoint_after_the_step_and_resumes_exactly(corpus, tmp_path, sig):
    env = deterministic_env()
    steps = 24  # enough that the signal lands well before the last step, even on a fast machine

    def command(out):
        cfg = tiny_config(corpus, out)
        cfg.train.exit_tokens = steps * 4 * 32
        cfg.run.save_every = 100  # the only checkpoint is the one Ctrl-C asks for
        return [PYTHON, "-m", "rwkvkit", "pretrain", *config_args(cfg)]

    subprocess.run(command(tmp_path / "whole"), env=env, check=True, capture_output=True, timeout=120)
    out_dir = tmp_path / "interrupted"
    log = tmp_path / "interrupted.log"
    with open(log, "w") as sink:  # a file, not a pipe: a full pipe would stall the run while we poll
        proc = subprocess.Popen(command(out_dir), env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + 90
            while time.time() < deadline and proc.poll() is None and len(read_metrics(out_dir)) < 3:
                time.sleep(0.01)
            assert proc.poll() is None, "the run ended before Ctrl-C"
            proc.send_signal(sig)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = log.read_text()
    assert proc.returncode == 130, output
    stopped_at = len(read_metrics(out_dir))
    assert 3 <= stopped_at < steps
    assert [p.name for p in ckpt.list_checkpoints(out_dir)] == [f"step-{stopped_at:08d}.pt"]
    assert f"interrupted after step {stopped_at}" in output
    resumed = subprocess.run(command(out_dir) + ["--run.resume", "auto"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(out_dir) == losses(tmp_path / "whole")  # bitwise, as after a kill


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    payload = {"format": "x", "step": 1, "model": {"w": torch.arange(1000.0)}}
    first = ckpt.save_checkpoint(payload, tmp_path, step=1, keep=3)

    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        ckpt.save_checkpoint({**payload, "step": 2}, tmp_path, step=2, keep=3)
    monkeypatch.undo()
    assert ckpt.list_checkpoints(tmp_path) == [first]
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no temp file left behind
    assert torch.equal(ckpt.find_resume(tmp_path, "auto")["model"]["w"], torch.arange(1000.0))


def test_a_torn_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    ckpt.save_checkpoint({"step": 1, "model": {}}, tmp_path, step=1, keep=3)
    ckpt.checkpoint_path(tmp_path, 2).write_bytes(b"garbage")  # e.g. a copy cut short by hand
    assert ckpt.find_resume(tmp_path, "auto")["step"] == 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    from rwkvkit.models import RWKVConfig, build_model
    from rwkvkit.train import parallel
    from rwkvkit.train.data import open_pretrain_data
    from rwkvkit.train.loop import LMObjective, Trainer, TrainingDiverged

    class PoisonAtCall5(LMObjective):
        calls = 0

        def forward(self, idx, targets, mask=None, cu_seqlens=None):
            PoisonAtCall5.calls += 1
            loss = super().forward(idx, targets, mask, cu_seqlens)
            return loss * float("nan") if PoisonAtCall5.calls == 5 else loss

    cfg = tiny_config(corpus, tmp_path)
    cfg.run.save_every = 2
    mc = RWKVConfig("7", 2, 64, 128, head_size=32)
    torch.manual_seed(0)
    model = build_model(mc, init=True)
    data = open_pretrain_data(str(corpus), 32, 4)
    trainer = Trainer(cfg, model, data, parallel.DistInfo(), objective=PoisonAtCall5(model),
                      model_config=mc.to_dict())
    with pytest.raises(TrainingDiverged, match="loss is nan at step 5.*step-00000004.pt"):
        trainer.fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002.pt", "step-00000004.pt"]
    assert len(read_metrics(tmp_path)) == 4
    # the weights were not touched by the bad step
    saved = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 4))["model"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_cli_prints_a_one_line_error_for_missing_data(tmp_path):
    r = subprocess.run([PYTHON, "-m", "rwkvkit", "pretrain", "--data.data_file", str(tmp_path / "nope"),
                        "--run.out_dir", str(tmp_path / "out"), "--train.device", "cpu"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "nope.bin" in r.stderr


def test_metrics_file_has_one_record_per_step(reference_run):
    recs = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert {"loss", "lr", "tokens", "grad_norm", "tokens_per_s"} <= set(recs[0])
    assert recs[-1]["tokens"] == 12 * 4 * 32


@pytest.mark.parametrize("variant", [{"grad_cp": True}, {"accumulate": 2, "micro_bsz": 2}])
def test_checkpointing_and_accumulation_keep_the_losses(corpus, tmp_path, reference_run, variant):
    run(tiny_config(corpus, tmp_path, **variant))
    got, ref = losses(tmp_path), losses(reference_run)
    if variant.get("grad_cp"):
        assert got == ref  # recomputation repeats the same float operations
    else:
        # 2 x 2 samples accumulated = the same 4 samples per step (the sampler counts micro-steps), and L2Wrap's
        # gradient is scaled with the loss: equal up to float summation order
        assert got == pytest.approx(ref, rel=1e-5)


def test_a_token_id_outside_the_vocab_stops_with_a_data_error(corpus, tmp_path):
    """Checked on the host before the batch moves to the device (where it would be a device-side assert)."""
    from rwkvkit.errors import DataError
    from rwkvkit.models import RWKVConfig, build_model
    from rwkvkit.train import parallel
    from rwkvkit.train.data import open_pretrain_data
    from rwkvkit.train.loop import Trainer

    mc = RWKVConfig("7", 1, 64, 16, head_size=32)  # the corpus uses ids up to 127
    model = build_model(mc, init=True)
    trainer = Trainer(tiny_config(corpus, tmp_path), model, open_pretrain_data(str(corpus), 32, 4),
                      parallel.DistInfo(), model_config=mc.to_dict())
    with pytest.raises(DataError, match=r"micro-step 0: the data holds token id \d+ but the model's vocab_size is 16"):
        trainer.fit()


def test_a_memory_budget_without_compiled_blocks_is_named(corpus, tmp_path):
    """The budget acts on torch.compile's partition of the blocks: without compile it would do nothing."""
    from rwkvkit.errors import ConfigError

    with pytest.raises(ConfigError, match="compile_memory_budget.*--train.compile true"):
        run(tiny_config(corpus, tmp_path, compile_memory_budget=0.5))


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_separate_documents_give_each_document_the_loss_it_has_alone(version):
    """With cu_seqlens the loss of a batch is the mean over its documents' tokens, each document run from a zero
    state (RWKV-7's value residual and all token shifts included); without, the documents see each other."""
    from rwkvkit.data.dataset import Batch
    from rwkvkit.models import RWKVConfig, build_model
    from rwkvkit.train.loop import LMObjective

    torch.manual_seed(0)
    model = build_model(RWKVConfig(version, 2, 32, 20, head_size=16), init=True)
    with torch.no_grad():  # (RWKV-LM's init zeroes output projections: nothing would flow between tokens)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.tensor([[3, 4, 0, 5, 6, 7, 0, 8, 9], [1, 0, 2, 3, 4, 5, 6, 7, 8]])
    targets = torch.randint(1, 20, ids.shape)
    objective = LMObjective(model, head_chunk=0)
    cu = torch.from_numpy(Batch(ids.numpy(), targets.numpy()).document_cu_seqlens())
    packed = objective(ids, targets, cu_seqlens=cu)
    token_losses = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        hidden, _ = model.hidden(ids.view(-1)[start:end].unsqueeze(0))
        logits = hidden[0].float() @ model.head.weight.float().T
        token_losses.append(torch.nn.functional.cross_entropy(logits, targets.view(-1)[start:end], reduction="none"))
    alone = torch.cat(token_losses).mean()
    assert packed.item() == pytest.approx(alone.item(), rel=1e-5)
    assert abs(objective(ids, targets).item() - alone.item()) > 1e-3


def test_a_run_with_separate_documents_trains(corpus, tmp_path, reference_run):
    """The whole trainer path: a run with the flag lowers the loss and differs from one without it (the toy
    documents are shorter than a window). (Resuming needs nothing new: the cuts come from the batch, which the
    saved data position names.)"""
    cfg = tiny_config(corpus, tmp_path / "a")
    cfg.data.separate_documents = True
    run(cfg)
    ls = losses(tmp_path / "a")
    assert ls[-1] < ls[0] - 0.5
    assert ls != pytest.approx(losses(reference_run), rel=1e-4)
