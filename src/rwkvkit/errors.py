"""User-facing errors. The CLI prints these as one line (no traceback) and exits with status 2."""


class RwkvkitError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class CheckpointError(RwkvkitError):
    """A file that is missing, truncated, foreign, or does not match any known RWKV layout."""


class ConfigError(RwkvkitError):
    """An invalid option, recipe or strategy string."""


class DataError(RwkvkitError):
    """Bad training or evaluation data (malformed jsonl, wrong field, too little data...)."""


class TokenizerError(RwkvkitError):
    """Text or token ids the tokenizer cannot handle."""
