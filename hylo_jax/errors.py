"""The error types hylo_jax raises on bad input. Each message names the offending item."""


class HyloError(Exception):
    """Base class of every error hylo_jax raises on purpose."""


class ConfigError(HyloError, ValueError):
    """A config file or override is malformed, has unknown keys, or holds an invalid value."""


class MeshError(ConfigError):
    """The device mesh does not fit the devices, or does not divide a dimension it shards."""


class EvalError(HyloError, ValueError):
    """An evaluation request is invalid: unknown task, empty or over-long prompt, malformed data file."""


class CheckpointError(HyloError):
    """A checkpoint or model folder is missing, truncated, or does not match the model."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture is not one hylo_jax can import."""


class RequestError(HyloError, ValueError):
    """An inference or evaluation request that cannot be served (empty prompt, longer than the cache)."""
