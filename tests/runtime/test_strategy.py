import pytest
import torch

from rwkvkit.errors import ConfigError
from rwkvkit.runtime.strategy import Stage, parse_stages, parse_strategy


@pytest.mark.parametrize(
    "text,device,dtype",
    [
        ("cpu fp32", "cpu", torch.float32),
        ("cpu bf16", "cpu", torch.bfloat16),
        ("  cpu fp32 ", "cpu", torch.float32),
        ("cpu fp32 *6 -> cpu fp32", "cpu", torch.float32),  # several stages, but one device and one dtype
        ("cpu fp32 *3->cpu fp32 *10", "cpu", torch.float32),
    ],
)
def test_single_device_single_dtype_strategies_are_accepted(text, device, dtype):
    s = parse_strategy(text)
    assert (s.device, s.torch_dtype) == (device, dtype)


def test_the_full_official_grammar_parses_into_stages():
    stages = parse_stages("cuda:0 fp16i8 *10+ -> cuda:1 fp16 *8 -> cpu fp32")
    assert stages == [
        Stage("cuda:0", "fp16", "i8", 10, True),
        Stage("cuda:1", "fp16", None, 8, False),
        Stage("cpu", "fp32", None, None, False),
    ]


@pytest.mark.parametrize(
    "text,reason",
    [
        ("cpu fp32i4", "quantization"),
        ("cuda fp16i4", "quantization"),
        ("cpu fp32i8 *6 -> cpu fp32", "several devices or dtypes"),  # the official package quietly runs this as plain fp16
        ("cpu fp32 *2+", "streaming"),
        ("cuda fp16 *10 -> cpu fp32", "several devices"),
        ("cpu fp32 *6 -> cpu bf16", "several devices or dtypes"),
        ("dml fp32", "DirectML"),
        ("cpu fp16", "fp16 is not supported on CPU"),
        ("cpu", "invalid strategy"),
        ("gpu fp16", "invalid strategy"),
        ("cpu fp64", "invalid strategy"),
        ("cpu fp32 * 3", "invalid strategy"),
        ("", "invalid strategy"),
    ],
)
def test_unsupported_or_invalid_strategies_are_refused_loudly(text, reason):
    with pytest.raises(ConfigError, match=reason):
        parse_strategy(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        parse_strategy("cuda fp16")


def test_int8_weights_are_accepted():
    s = parse_strategy("cpu fp32i8")
    assert (s.device, s.dtype, s.quant) == ("cpu", "fp32", "i8")
    assert parse_strategy("cpu bf16").quant is None
