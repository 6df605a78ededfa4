import pytest
import torch
from runtime_helpers import official_state_dict

from rwkvkit.cli import main
from rwkvkit.generate import unescape


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    """A tiny RWKV-7 with the World vocabulary size, so that the World tokenizer is picked automatically."""
    path = tmp_path_factory.mktemp("cli") / "tiny-world.pth"
    torch.save(official_state_dict("7", vocab=65536), path)
    return str(path)


def generate(capsys, *args):
    assert main(["generate", *args]) == 0
    return capsys.readouterr().out


def test_generate_streams_text_reproducibly_and_cuts_at_stop_strings(world_model, capsys):
    common = ["--model", world_model, "--prompt", "Hello\\n", "--max-tokens", "16", "--top-p", "1", "--top-k", "40"]
    full = generate(capsys, *common, "--seed", "3")
    assert full.endswith("\n") and len(full) > 10
    assert generate(capsys, *common, "--seed", "3") == full
    assert generate(capsys, *common, "--seed", "4") != full
    stop = next(c for c in full[len(full) // 2 :] if not c.isspace())
    cut = generate(capsys, *common, "--seed", "3", "--stop", stop)
    assert cut == full.split(stop)[0] + "\n"


def test_generate_errors_are_one_line(world_model, capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "missing.pth")]) == 2
    assert main(["generate", "--model", world_model, "--top_p", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("rwkvkit generate: error:") for line in err)


def test_unescape_understands_shell_typed_escapes():
    assert unescape("a\\n\\nb\\tc\\\\n\\x") == "a\n\nb\tc\\n\\x"


def test_generate_with_int8_weights(world_model, capsys):
    out = generate(capsys, "--model", world_model, "--prompt", "Hi", "--max-tokens", "8", "--seed", "1",
                   "--dtype", "bf16", "--int8", "true")
    assert len(out) > 1
