"""Fixtures over the official-layout checkpoint builder in tests/support/official_checkpoints.py."""

from __future__ import annotations

import pytest
import torch
from official_checkpoints import TINY, official_state_dict


@pytest.fixture(scope="session")
def official_sd():
    """`official_state_dict` for test modules (they cannot `import conftest`: every test folder has one)."""
    return official_state_dict


@pytest.fixture(scope="session")
def tiny_dims():
    return TINY


@pytest.fixture
def make_checkpoint(tmp_path):
    """make_checkpoint(version, name=None, **overrides) -> path of an official-layout .pth in tmp_path."""

    def make(version: str, name: str | None = None, seed: int = 0, dtype=torch.float32, **overrides):
        path = tmp_path / (name or f"rwkv-v{version}.pth")
        torch.save(official_state_dict(version, seed=seed, dtype=dtype, **overrides), path)
        return path

    return make
