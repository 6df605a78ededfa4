import pytest
import torch
from runtime_helpers import official_state_dict


@pytest.fixture
def official_checkpoint(tmp_path):
    """official_checkpoint(version, **overrides) -> path of a tiny random official-layout .pth."""

    def make(version: str, seed: int = 0, **overrides):
        path = tmp_path / f"tiny-v{version}-{seed}.pth"
        torch.save(official_state_dict(version, seed=seed, **overrides), path)
        return path

    return make
