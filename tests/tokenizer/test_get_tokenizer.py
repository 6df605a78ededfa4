"""Picking a tokenizer by name, by file, or by a model's vocab size."""

import pickle

import pytest

from rwkvkit.errors import TokenizerError
from rwkvkit.tokenizer import NeoXTokenizer, WorldTokenizer, get_tokenizer, tokenizer_for_vocab
from rwkvkit.tokenizer.world import find_world_vocab


def test_world_by_name_is_shared():
    world = get_tokenizer("world")
    assert isinstance(world, WorldTokenizer) and world.vocab_size == 65536
    assert get_tokenizer() is world and get_tokenizer("rwkv_vocab_v20230424") is world
    assert tokenizer_for_vocab(65536) is world
    assert get_tokenizer(world) is world


def test_by_file(shared_dir):
    world = get_tokenizer(find_world_vocab())
    assert isinstance(world, WorldTokenizer) and world.encode("User") == [24281]
    neox = get_tokenizer(shared_dir / "data" / "20B_tokenizer.json")
    assert isinstance(neox, NeoXTokenizer)
    assert get_tokenizer("neox", path=shared_dir / "data" / "20B_tokenizer.json") is neox
    assert tokenizer_for_vocab(50277, path=shared_dir / "data" / "20B_tokenizer.json") is neox
    assert tokenizer_for_vocab(50304, path=shared_dir / "data" / "20B_tokenizer.json") is neox


def test_errors(tmp_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer 'gpt2'"):
        get_tokenizer("gpt2")
    with pytest.raises(TokenizerError, match="no known tokenizer for vocab size 32000"):
        tokenizer_for_vocab(32000)
    with pytest.raises(TokenizerError, match="unknown tokenizer engine"):
        get_tokenizer("world", engine="cuda")
    with pytest.raises(TokenizerError, match="NeoX tokenizer file not found"):
        get_tokenizer("neox", path=tmp_path / "missing.json")


def test_tokenizers_pickle_for_worker_processes(shared_dir):
    for tokenizer in (get_tokenizer("world"), get_tokenizer("neox", path=shared_dir / "data" / "20B_tokenizer.json")):
        clone = pickle.loads(pickle.dumps(tokenizer))
        assert type(clone) is type(tokenizer) and clone.encode("Hi 😀") == tokenizer.encode("Hi 😀")
    assert pickle.loads(pickle.dumps(get_tokenizer("world"))).engine == get_tokenizer("world").engine
