"""Typed configs: dataclasses loaded from YAML with `key=value` command-line overrides.

Every field carries its documentation in `field(metadata={"doc": ...})`; `describe(cls)` prints it.
Unknown keys and values of the wrong type are `ConfigError`s, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from hylo_jax.errors import ConfigError

T = TypeVar("T")


def require_positive(cfg: Any, section: str, names: tuple[str, ...]) -> None:
    """`ConfigError` naming the first of `names` whose value on `cfg` is not > 0."""
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{section}{name} must be positive, got {getattr(cfg, name)}")


def doc(default: Any, text: str, *, factory: bool = False) -> Any:
    """A dataclass field with a default and its documentation."""
    if factory:
        return dataclasses.field(default_factory=default, metadata={"doc": text})
    return dataclasses.field(default=default, metadata={"doc": text})


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: the frequencies and their long-context scaling."""

    theta: float = doc(10000.0, "Base of the rotary frequencies.")
    type: Literal["default", "llama3", "yarn"] = doc("default", "Frequency scaling rule.")
    factor: float = doc(1.0, "Context extension factor (llama3, yarn).")
    original_max_position_embeddings: int = doc(8192, "Pre-extension context length (llama3, yarn).")
    low_freq_factor: float = doc(1.0, "llama3: wavelengths above orig/low_freq_factor are scaled fully.")
    high_freq_factor: float = doc(4.0, "llama3: wavelengths below orig/high_freq_factor are kept.")
    beta_fast: float = doc(32.0, "yarn: rotations per context above which a dimension is kept.")
    beta_slow: float = doc(1.0, "yarn: rotations per context below which a dimension is interpolated.")
    mscale: float = doc(1.0, "yarn: scale of the attention temperature correction 0.1*mscale*ln(factor)+1.")
    mscale_all_dim: float = doc(0.0, "yarn (DeepSeek): divides the correction; 0 means plain YaRN.")
    attention_factor: float | None = doc(None, "yarn: explicit cos/sin scale; None derives it from mscale.")
    truncate: bool = doc(True, "yarn: round the correction range to whole dimensions.")


MAX_DOCS_PER_ROW = 32  # data.max_docs_per_row's default (here: model-side code imports it without grain)


def segment_bound(max_docs_per_row: int) -> int:
    """model.max_segments for rows of at most `max_docs_per_row` documents: one more run for the trailing
    padding; 0 (no bound) stays 0 (a dense mask)."""
    return max_docs_per_row + 1 if max_docs_per_row else 0


def packed_bounds(max_segments: int) -> tuple[int, ...]:
    """The segment bounds a stage may compile steps for, smallest first: max_segments - 1 documents (+1 run of
    padding), a quarter of them, and so on (33 -> 3, 9, 33). cuDNN's packed backward clears a float32
    workspace of bound x T rows per attention layer (H200, 8K tokens, 8 documents: 1.29 ms fwd+bwd at bound
    33, 0.99 at 9), so each batch takes the smallest bound that holds its rows."""
    bounds, docs = [], max_segments - 1
    while docs >= 1:
        bounds.append(docs + 1)
        docs //= 4
    return tuple(reversed(bounds)) or (max_segments,)


def packed_bound(runs: int, max_segments: int) -> int:
    """The smallest of `packed_bounds(max_segments)` that holds rows of `runs` runs (the largest if none does)."""
    return next((b for b in packed_bounds(max_segments) if b >= runs), max_segments)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Transformer teacher (Llama, Qwen2, Qwen3 families)."""

    arch: Literal["llama", "qwen2", "qwen3"] = doc("llama", "Architecture family.")
    vocab_size: int = doc(32000, "Vocabulary size.")
    hidden_size: int = doc(512, "Model width d.")
    intermediate_size: int = doc(1376, "SwiGLU MLP width.")
    num_layers: int = doc(4, "Number of decoder layers.")
    num_heads: int = doc(8, "Query heads.")
    num_kv_heads: int = doc(8, "Key/value heads (GQA when fewer than num_heads).")
    head_dim: int = doc(64, "Per-head width (Qwen3 decouples it from hidden_size / num_heads).")
    rms_norm_eps: float = doc(1e-6, "RMSNorm epsilon.")
    max_position_embeddings: int = doc(8192, "Longest context the checkpoint was trained for.")
    rope: RopeConfig = doc(RopeConfig, "Rotary embedding.", factory=True)
    tie_word_embeddings: bool = doc(False, "LM head shares the input embedding matrix.")
    attention_bias: bool = doc(False, "Bias on q/k/v projections (Qwen2).")
    qk_norm: bool = doc(False, "Per-head RMSNorm on queries and keys before RoPE (Qwen3).")
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "Compute dtype of activations.")
    param_dtype: Literal["float32", "bfloat16"] = doc("float32", "Storage dtype of parameters.")
    attention_impl: Literal["auto", "xla", "cudnn", "splash"] = doc(
        "auto", "Attention kernel: auto = cuDNN on GPU, splash on TPU, XLA on CPU.")
    max_segments: int = doc(
        0, "Most runs of equal segment ids (packed documents, trailing padding) in a row: cuDNN then takes "
           "them in its packed layout instead of a dense [T, T] mask. 0: the dense mask. The trainer sets it "
           "from data.max_docs_per_row and checks every batch.")
    remat: Literal["none", "full", "dots", "dots_no_batch", "save_attention_out"] = doc(
        "none", "Activation checkpointing policy per decoder layer.")

    def __post_init__(self) -> None:
        require_positive(self, "model.", ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                          "num_heads", "num_kv_heads", "head_dim"))
        if self.max_segments < 0:
            raise ConfigError(f"model.max_segments must be >= 0, got {self.max_segments}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads={self.num_heads} is not a multiple of "
                              f"model.num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for RoPE")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Named device mesh. Sizes multiply to the device count; one size may be -1 (fill)."""

    data: int = doc(1, "Pure data parallelism (parameters replicated).")
    fsdp: int = doc(-1, "Data parallelism with parameters, gradients and optimiser state sharded.")
    tensor: int = doc(1, "Tensor parallelism over heads and MLP width.")
    sequence: int = doc(1, "Context parallelism over the sequence axis.")
    context_parallel: Literal["allgather", "ring"] = doc(
        "allgather", "Attention with sequence > 1: all-gather the MLA latents / K-V once, or pass them "
                     "around a ring (ppermute overlapped with the block compute).")
    load_balance: bool = doc(False, "Zig-zag token layout for sequence > 1 (shard s holds chunks s and "
                                    "2S-1-s), so causal attention work is equal on every shard.")
    cp_attention: Literal["auto", "xla", "pallas"] = doc(
        "auto", "Block attention with sequence > 1: the Pallas flash block kernel ('auto' takes it on GPU "
                "where it supports the head dims) or XLA's online softmax over query tiles.")


# --------------------------------------------------------------------------------------------
# Generic dataclass <-> dict machinery.


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Checks (and where lossless, converts) a YAML value against a field annotation."""
    origin = get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin is Literal:
        if value not in get_args(annotation):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(annotation))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = get_args(annotation)[:1] or (Any,)
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Builds dataclass `cls` from a nested dict; unknown keys raise `ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass as plain nested dicts/lists, ready for YAML."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in order."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}  # deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping; a missing file or a non-mapping is a `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return data


def save_yaml(obj: Any, path: str | Path) -> None:
    """Writes a dataclass (or dict) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def replace(obj: T, **changes: Any) -> T:
    """`dataclasses.replace` re-validated through `from_dict`."""
    data = to_dict(obj)
    data.update(changes)
    return from_dict(type(obj), data)


def describe(cls: type, prefix: str = "") -> str:
    """One line per field: dotted key, default and documentation."""
    lines = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            lines.append(describe(hint, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{prefix}{f.name} = {default!r}  # {f.metadata.get('doc', '')}")
    return "\n".join(lines)
