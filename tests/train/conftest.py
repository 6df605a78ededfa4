from __future__ import annotations

from pathlib import Path

import pytest

from train_helpers import write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "toy")
