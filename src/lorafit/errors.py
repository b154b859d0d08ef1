"""lorafit's own errors: each says what was wrong and what to do.

The CLI prints `error: <message>` for any `LorafitError` and exits with status 2,
so a user's mistake never shows a traceback from deep inside torch.
"""

from __future__ import annotations


class LorafitError(Exception):
    """Base class of every error lorafit raises on purpose (bad input, bad config)."""


class ConfigError(LorafitError, ValueError):
    """A configuration value is out of range, unknown or of the wrong type."""


class TargetError(LorafitError, ValueError):
    """LoRA targets that match nothing, match a non-Linear module, or clash."""


class AdapterError(LorafitError, ValueError):
    """An adapter folder is missing, corrupt, pickled, or does not fit the model."""


class DataError(LorafitError, ValueError):
    """A dataset source is missing, in the wrong layout, corrupt or unusable."""


class ModelLoadError(LorafitError):
    """A pretrained model cannot be found or has no sequence-classification head."""


class RunDirError(LorafitError):
    """A run folder is missing, not a lorafit run, or would be overwritten."""


class Interrupted(LorafitError):
    """Ctrl-C during training; a checkpoint was saved."""
