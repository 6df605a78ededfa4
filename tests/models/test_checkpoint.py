"""Checkpoint detection, validation, save/load round trips, `rwkvkit.load`, and the `info` / `convert` verbs."""

from __future__ import annotations

import zipfile

import pytest
import torch

import rwkvkit
from rwkvkit.cli import main as cli
from rwkvkit.errors import CheckpointError
from rwkvkit.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

VERSIONS = ["4", "5.2", "6", "7"]


@pytest.mark.parametrize("version", VERSIONS)
def test_detects_version_and_dimensions(make_checkpoint, tiny_dims, version):
    d = tiny_dims[version]
    _, cfg = read_checkpoint(make_checkpoint(version))
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.dim_ffn) == (
        version, d["n_layer"], d["n_embd"], d["vocab"], d["dim_ffn"],
    )  # fmt: skip
    if version != "4":
        assert cfg.head_size == d["head_size"]
    lora = {k: d[k] for k in ("mix_lora", "decay_lora", "w_lora", "a_lora", "v_lora", "g_lora") if k in d}
    assert cfg.lora_dims() == lora


@pytest.mark.parametrize("version", VERSIONS)
def test_pth_round_trip_is_exact(tmp_path, make_checkpoint, version):
    path = make_checkpoint(version)
    original = torch.load(path, weights_only=True)
    model = load_checkpoint(path)
    save_checkpoint(model, tmp_path / "again.pth")
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_folder_round_trip_with_dtype(tmp_path, make_checkpoint, dtype):
    path = make_checkpoint("7")
    original, cfg = read_checkpoint(path)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    save_checkpoint(load_checkpoint(path), tmp_path / "folder", dtype=dtype)
    sd, cfg2 = read_checkpoint(tmp_path / "folder")
    assert cfg2 == cfg
    assert all(torch.equal(sd[k], original[k].to(torch_dtype)) for k in original)
    model = rwkvkit.load(tmp_path / "folder", dtype="fp32")
    assert not model.training and model.emb.weight.dtype == torch.float32


def test_load_fp16_file_on_cpu_gives_fp32(make_checkpoint):
    path = make_checkpoint("6", dtype=torch.float16)
    assert rwkvkit.load(path).emb.weight.dtype == torch.float32
    assert rwkvkit.load(path, dtype="bf16").emb.weight.dtype == torch.bfloat16
    model = rwkvkit.load(make_checkpoint("7", name="bf.pth", dtype=torch.bfloat16))
    assert model.emb.weight.dtype == torch.bfloat16
    assert model.tokenizer is None  # vocab 97 matches no official tokenizer
    logits, _ = model([1, 2, 3])
    assert logits.shape == (3, 97)


def _bad(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _cli_error(capsys, *argv) -> str:
    """Run the CLI, expect exit status 2 and exactly one error line without a traceback; return that line."""
    assert cli(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_files_give_one_line_errors(tmp_path, make_checkpoint, capsys):
    good = make_checkpoint("7")
    truncated = _bad(tmp_path, "cut.pth", good.read_bytes()[: good.stat().st_size // 2])
    with zipfile.ZipFile(tmp_path / "other.pth", "w") as z:
        z.writestr("readme.txt", "not weights")
    cases = {
        tmp_path / "missing.pth": "checkpoint not found",
        _bad(tmp_path, "random.pth", bytes(range(256)) * 16): "not a PyTorch checkpoint",
        _bad(tmp_path, "text.pth", b"hello, I am a text file\n"): "not a PyTorch checkpoint",
        tmp_path / "other.pth": "zip archive, but not a PyTorch checkpoint",
        truncated: "truncated",
        tmp_path: "not a checkpoint folder",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(path)
        assert message in _cli_error(capsys, "info", str(path))


def test_layout_problems_are_named(tmp_path, capsys, official_sd):
    def write(name, sd):
        torch.save(sd, tmp_path / name)
        return str(tmp_path / name)

    sd = official_sd("7")
    missing = {k: v for k, v in sd.items() if k != "blocks.1.att.k_a"}
    extra = {**sd, "blocks.0.att.time_state": torch.zeros(4, 16, 16)}
    wrong = {**sd, "blocks.1.ffn.x_k": torch.zeros(1, 1, 32)}
    unknown = {k: v for k, v in official_sd("5.2").items() if ".ln_x." not in k}  # 5.2 minus ln_x
    v51 = {k: v for k, v in official_sd("5.2").items() if "time_faaaa" not in k}
    v51 = {k: (v[:, :1] if k.endswith("time_decay") else v) for k, v in v51.items()}
    not_rwkv = {"model.weight": torch.zeros(3)}
    assert "missing keys: blocks.1.att.k_a" in _cli_error(capsys, "info", write("m.pth", missing))
    assert "unexpected keys: blocks.0.att.time_state" in _cli_error(capsys, "info", write("e.pth", extra))
    assert "blocks.1.ffn.x_k has shape [1, 1, 32], expected [1, 1, 64]" in _cli_error(
        capsys, "info", write("w.pth", wrong)
    )
    assert "not supported" in _cli_error(capsys, "info", write("51.pth", v51))
    assert "not an RWKV checkpoint" in _cli_error(capsys, "info", write("n.pth", not_rwkv))
    assert "unknown RWKV version" in _cli_error(capsys, "info", write("u.pth", unknown))


def test_info_cli(make_checkpoint, capsys, official_sd):
    assert cli(["info", str(make_checkpoint("6"))]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    expected = {"version": "6", "layers": "2", "width": "64", "heads": "4", "head_size": "16", "vocab": "97",
                "ffn_dim": "224", "mix_lora": "8", "decay_lora": "16", "dtype": "float32"}  # fmt: skip
    assert expected.items() <= lines.items()
    assert int(lines["parameters"]) == sum(t.numel() for t in official_sd("6").values())


def test_convert_cli_round_trip(tmp_path, make_checkpoint, capsys):
    src = make_checkpoint("5.2")
    folder, back = tmp_path / "hf", tmp_path / "back.pth"
    assert cli(["convert", str(src), str(folder), "--dtype", "bf16"]) == 0
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert cli(["convert", str(folder), str(back)]) == 0
    original, converted = torch.load(src, weights_only=True), torch.load(back, weights_only=True)
    assert converted.keys() == original.keys()
    assert all(converted[k].dtype == torch.bfloat16 for k in converted)
    assert all(torch.equal(converted[k], original[k].bfloat16()) for k in original)
    assert capsys.readouterr().out.count("wrote ") == 2
    assert "--dtype" in _help(capsys, "convert")


def _help(capsys, verb) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli([verb, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_v7_file_without_layer0_value_residual_loads(tmp_path, official_sd):
    """Layer 0 never uses att.v0/v1/v2, so a file that leaves them out is still complete."""
    sd = official_sd("7")
    unused = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
    torch.save({k: v for k, v in sd.items() if k not in unused}, tmp_path / "a.pth")
    torch.save(sd, tmp_path / "b.pth")
    tokens = [3, 1, 4, 1, 5]
    with torch.no_grad():
        without, _ = load_checkpoint(tmp_path / "a.pth")(tokens)
        full, _ = load_checkpoint(tmp_path / "b.pth")(tokens)
    assert torch.equal(without, full)


def test_load_picks_the_world_tokenizer_for_vocab_65536(make_checkpoint):
    pytest.importorskip("rwkvkit.tokenizer")
    path = make_checkpoint("7", n_embd=32, vocab=65536, dim_ffn=128)
    model = rwkvkit.load(path)
    assert model.tokenizer is not None and model.tokenizer.vocab_size == 65536
    ids = model.tokenizer.encode("Hello world")
    logits, _ = model(ids)
    assert logits.shape == (len(ids), 65536)
    assert rwkvkit.load(path, tokenizer=None).tokenizer is None


def test_bad_folders_give_one_line_errors(tmp_path, make_checkpoint, capsys):
    folder = tmp_path / "hf"
    save_checkpoint(load_checkpoint(make_checkpoint("6")), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "not a readable safetensors file" in _cli_error(capsys, "info", str(folder))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "rwkv7"}')
    assert "not an rwkvkit folder (config.json model_type 'rwkv7')" in _cli_error(capsys, "info", str(foreign))
