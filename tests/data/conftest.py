import pytest
from data_helpers import ByteTokenizer


@pytest.fixture
def byte_tok() -> ByteTokenizer:
    return ByteTokenizer()
