"""Checkpoints: official BlinkDL `.pth` files and HF-style folders (`config.json` + `model.safetensors`).

The version and every dimension are read from the key names and shapes; the keys are then checked against the
model that those dimensions describe, so a damaged or foreign file fails with one line naming the problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path

import torch

from rwkvkit.errors import CheckpointError, ConfigError
from rwkvkit.models import build_model
from rwkvkit.models.common import RWKVConfig, RWKVModel, _first_line

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FOLDER_FORMAT = "rwkvkit"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype | None:
    """None, a torch.dtype, or one of fp32/fp16/bf16 (also float32/float16/bfloat16)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
    name = aliases.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    return DTYPES[name]


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one step, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ reading


def _load_pth(path: Path) -> dict:
    with open(path, "rb") as f:
        magic = f.read(4)
    is_zip = magic == b"PK\x03\x04"
    try:
        # mmap keeps multi-GB checkpoints out of RAM until used; it needs the (default) zip format
        obj = torch.load(path, map_location="cpu", mmap=is_zip, weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e) and magic[:1] in (b"\x80", b"PK"):
            raise CheckpointError(
                f"{path}: holds Python objects besides tensors, or is damaged (only weights are loaded)"
            ) from None
        if not is_zip:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint") from None
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint (the zip index is missing)") from None
        with zipfile.ZipFile(path) as z:
            if not any(name.endswith("data.pkl") for name in z.namelist()):
                raise CheckpointError(f"{path}: a zip archive, but not a PyTorch checkpoint") from None
        raise CheckpointError(f"{path}: corrupt checkpoint ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not an RWKV checkpoint (holds a {type(obj).__name__}, not a state dict)")
    return obj


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _read_folder_config(folder: Path) -> dict:
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no {CONFIG_NAME})")
    try:
        raw = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({_first_line(e)})") from None
    if not isinstance(raw, dict) or raw.get("format") != FOLDER_FORMAT:
        kind = raw.get("model_type", "unknown") if isinstance(raw, dict) else "unknown"
        raise CheckpointError(f"{folder}: not an rwkvkit folder (config.json model_type {kind!r})")
    return raw


def read_checkpoint(path) -> tuple[dict, RWKVConfig]:
    """The raw state dict (CPU, possibly memory-mapped, stored dtypes) and the config it describes, validated."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raw = _read_folder_config(path)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"{path}: no {WEIGHTS_NAME} in the folder")
        sd = _load_safetensors(weights)
        fields = {k: v for k, v in raw.items() if k not in ("format", "dtype")}
        try:
            config = RWKVConfig.from_dict(fields)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{path / CONFIG_NAME}: {_first_line(e)}") from None
    else:
        sd = _load_safetensors(path) if path.suffix == ".safetensors" else _load_pth(path)
        config = detect_config(sd, path)
        if config.version == "7":
            _add_unused_v7_layer0_tensors(sd, config)
    validate_state_dict(sd, config, path)
    return sd, config


# ------------------------------------------------------------------------------------------------ detection


def detect_config(sd: dict, path="checkpoint") -> RWKVConfig:
    """Version and dimensions from the key names and shapes of an official state dict."""
    if "_strategy" in sd:
        raise CheckpointError(
            f"{path}: converted by the rwkv package for strategy {sd['_strategy']!r}; use the original .pth"
        )
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not an RWKV checkpoint (entry {bad[0]!r} is not a tensor)")
    if "emb.weight" not in sd or not any(k.startswith("blocks.") for k in sd):
        raise CheckpointError(f"{path}: not an RWKV checkpoint (no emb.weight / blocks.* keys)")

    def shape(key):
        if key not in sd:
            raise CheckpointError(f"{path}: missing key {key}")
        return tuple(sd[key].shape)

    vocab, n_embd = shape("emb.weight")
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    dims = dict(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab, dim_ffn=shape("blocks.0.ffn.key.weight")[0])
    att = "blocks.0.att."
    try:
        if att + "r_k" in sd:
            n_head, head_size = shape(att + "r_k")
            v1 = f"blocks.{n_layer - 1}.att.v1"  # the last layer's: layer 0 may leave out its unused v0/v1/v2
            return RWKVConfig(
                "7", head_size=head_size, w_lora=shape(att + "w1")[1], a_lora=shape(att + "a1")[1],
                v_lora=shape(v1)[1] if v1 in sd else None, g_lora=shape(att + "g1")[1], **dims,
            )  # fmt: skip
        if att + "time_maa_x" in sd:
            n_head, head_size = shape(att + "time_faaaa")
            return RWKVConfig(
                "6", head_size=head_size, dim_att=shape(att + "key.weight")[0],
                mix_lora=shape(att + "time_maa_w1")[1] // 5, decay_lora=shape(att + "time_decay_w1")[1], **dims,
            )  # fmt: skip
        if att + "ln_x.weight" in sd:
            decay = shape(att + "time_decay")
            if len(decay) == 2 and decay[1] > 1 and att + "gate.weight" in sd and att + "time_faaaa" in sd:
                return RWKVConfig("5.2", head_size=decay[1], dim_att=shape(att + "key.weight")[0], **dims)
            sub = "5.1" if att + "gate.weight" in sd else "5.0"
            raise CheckpointError(f"{path}: RWKV-{sub} (pre-release Eagle) is not supported; only RWKV-5.2 is")
        if att + "time_first" in sd and att + "time_mix_k" in sd:
            return RWKVConfig("4", dim_att=shape(att + "key.weight")[0], **dims)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {_first_line(e)}") from None
    raise CheckpointError(f"{path}: unknown RWKV version (the block keys match none of v4, v5.2, v6, v7)")


def _add_unused_v7_layer0_tensors(sd: dict, config: RWKVConfig) -> None:
    """Layer 0 never uses the value-residual tensors v0/v1/v2; accept files that leave them out (as zeros)."""
    C, D = config.n_embd, config.v_lora
    shapes = {"v0": (1, 1, C), "v1": (C, D), "v2": (D, C)}
    for name, shape in shapes.items():
        sd.setdefault(f"blocks.0.att.{name}", torch.zeros(shape, dtype=sd["emb.weight"].dtype))


def _names(keys, limit=4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def expected_shapes(config: RWKVConfig) -> dict[str, tuple]:
    with torch.device("meta"):
        model = build_model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def validate_state_dict(sd: dict, config: RWKVConfig, path="checkpoint") -> None:
    """Name the missing, unexpected and mis-shaped keys (one line), if any."""
    want = expected_shapes(config)
    missing = want.keys() - sd.keys()
    extra = sd.keys() - want.keys()
    wrong = [k for k in want.keys() & sd.keys() if tuple(sd[k].shape) != want[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if extra:
        problems.append(f"unexpected keys: {_names(extra)}")
    if wrong:
        k = sorted(wrong)[0]
        more = f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""
        problems.append(f"{k} has shape {list(sd[k].shape)}, expected {list(want[k])}{more}")
    not_float = [k for k in sd.keys() & want.keys() if not sd[k].is_floating_point()]
    if not_float:
        problems.append(f"non-float tensors: {_names(not_float)}")
    if problems:
        raise CheckpointError(f"{path}: RWKV-{config.version} checkpoint does not match: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------ models


def model_from_state_dict(sd: dict, config: RWKVConfig, device="cpu", dtype=None) -> RWKVModel:
    """Build the model around the given tensors (no copy where device and dtype already match)."""
    dtype = parse_dtype(dtype) or sd["emb.weight"].dtype
    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, assign=True)
    return model


def load_checkpoint(path, device="cpu", dtype=None) -> RWKVModel:
    """A model from an official `.pth`, a `.safetensors` file, or an rwkvkit HF-style folder.

    dtype=None keeps the stored dtype (of emb.weight; a mixed file is cast to it). The model is in train mode, as
    torch builds it; `rwkvkit.load` is the user-facing entry (eval mode, tokenizer).
    """
    sd, config = read_checkpoint(path)
    return model_from_state_dict(sd, config, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------ writing


def _cpu_tensors(state_dict: dict, dtype=None) -> dict:
    dtype = parse_dtype(dtype)
    out = {}
    for k, v in state_dict.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    return out


def save_pth(state_dict: dict, path, dtype=None) -> Path:
    """Write an official-layout `.pth` (the RWKV-LM / rwkv package format)."""
    path = Path(path)
    tensors = _cpu_tensors(state_dict, dtype)
    with atomic_path(path) as tmp:
        torch.save(tensors, tmp)
    return path


def save_folder(state_dict: dict, config: RWKVConfig, folder, dtype=None) -> Path:
    """Write an HF-style folder: config.json (RWKVConfig fields) + model.safetensors (official key names)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} exists and is not a folder")
    tensors = _cpu_tensors(state_dict, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    stored = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    meta = {"format": FOLDER_FORMAT, **config.to_dict(), "dtype": stored.pop() if len(stored) == 1 else "mixed"}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "rwkv_version": config.version})
    with atomic_path(folder / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def save_checkpoint(model_or_sd, path, config: RWKVConfig | None = None, dtype=None) -> Path:
    """Save a model (or a state dict + config): a path ending in `.pth` gets the official file, else a folder."""
    if isinstance(model_or_sd, RWKVModel):
        config = config or model_or_sd.config
        state_dict = model_or_sd.state_dict()
    else:
        state_dict = model_or_sd
    if str(path).endswith(".pth"):
        return save_pth(state_dict, path, dtype)
    if config is None:
        raise ConfigError("saving a state dict to a folder needs its RWKVConfig")
    return save_folder(state_dict, config, path, dtype)


# ------------------------------------------------------------------------------------------------ info


def checkpoint_info(path) -> dict:
    """What `rwkvkit info` prints: version, dimensions, parameter count and stored dtype."""
    sd, config = read_checkpoint(path)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()})
    info = {
        "version": config.version,
        "layers": config.n_layer,
        "width": config.n_embd,
    }
    if config.version != "4":
        info["heads"] = config.n_head
        info["head_size"] = config.head_size
    info["dim_att"] = config.dim_att
    info["vocab"] = config.vocab_size
    info["ffn_dim"] = config.dim_ffn
    info.update(config.lora_dims())
    info["parameters"] = sum(t.numel() for t in sd.values())
    info["dtype"] = dtypes[0] if len(dtypes) == 1 else "mixed (" + ", ".join(dtypes) + ")"
    return info
