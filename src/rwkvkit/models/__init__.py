"""RWKV v4 / v5.2 / v6 / v7 models with the official parameter names, one file per version.

`build_model(config)` makes an (uninitialised) model; `rwkvkit.load(path)` loads a checkpoint.
"""

from __future__ import annotations

from rwkvkit.models.common import VERSIONS, RWKVConfig, RWKVModel, State

__all__ = ["RWKVConfig", "RWKVModel", "State", "VERSIONS", "build_model", "model_class"]


def model_class(version: str) -> type[RWKVModel]:
    """The model class of an RWKV version ("4", "5.2", "6" or "7")."""
    version = str(version)
    if version == "4":
        from rwkvkit.models.v4 import RWKV4 as cls
    elif version == "5.2":
        from rwkvkit.models.v5 import RWKV5 as cls
    elif version == "6":
        from rwkvkit.models.v6 import RWKV6 as cls
    elif version == "7":
        from rwkvkit.models.v7 import RWKV7 as cls
    else:
        from rwkvkit.errors import ConfigError

        raise ConfigError(f"unknown RWKV version {version!r}; expected one of {', '.join(VERSIONS)}")
    return cls


def build_model(config: RWKVConfig, init: bool = False) -> RWKVModel:
    """A model for `config`; with init=True its weights follow the official pretraining init of that version."""
    model = model_class(config.version)(config)
    if init:
        model.init_weights()
    return model
