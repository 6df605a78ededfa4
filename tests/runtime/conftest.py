import pytest
import torch
from runtime_helpers import official_state_dict

from rwkvkit.models.checkpoint import model_from_state_dict, read_checkpoint


@pytest.fixture
def official_checkpoint(tmp_path):
    """official_checkpoint(version, **overrides) -> path of a tiny random official-layout .pth."""

    def make(version: str, seed: int = 0, **overrides):
        path = tmp_path / f"tiny-v{version}-{seed}.pth"
        torch.save(official_state_dict(version, seed=seed, **overrides), path)
        return path

    return make


@pytest.fixture(scope="module")
def official_models(tmp_path_factory):
    """{version: model} for all four versions, each loaded from a tiny random official-layout .pth (eval mode)."""
    out = {}
    for version in ("4", "5.2", "6", "7"):
        path = tmp_path_factory.mktemp("models") / f"v{version}.pth"
        torch.save(official_state_dict(version, seed=3), path)
        out[version] = model_from_state_dict(*read_checkpoint(path)).eval()
    return out
