"""Import Hugging Face Llama / Qwen2 / Qwen3 checkpoints into hylo_jax parameters.

Names map one to one: our path `model.layers.3.self_attn.q_proj.kernel` is HF's
`model.layers.3.self_attn.q_proj.weight` transposed; `scale` and `embedding` are HF's `weight`.
Each tensor is read, checked, cast and placed on its sharding before the next is read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from hylo_jax.config import ModelConfig, RopeConfig
from hylo_jax.convert.sources import StateDictSource, TensorSource, find_gguf, open_folder
from hylo_jax.errors import CheckpointError, UnsupportedArchitectureError
from hylo_jax.models.hybrid import ModelSpec
from hylo_jax.models.transformer import CausalLM, check_mesh
from hylo_jax.sharding import path_str, state_shardings

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "qwen2", "qwen3")
# Buffers some checkpoints carry that are not parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def rope_from_hf(params: Mapping[str, Any] | None, default_theta: float = 10000.0) -> RopeConfig:
    """Our RopeConfig from transformers' standardised `rope_parameters`."""
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "llama3", "yarn"):
        raise UnsupportedArchitectureError(f"rope_type {kind!r} is not supported (default, llama3, yarn)")
    fields = {"theta": float(params.get("rope_theta", default_theta)), "type": kind}
    for key in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim", "attention_factor"):
        if params.get(key) is not None:
            fields[key] = float(params[key])
    if params.get("original_max_position_embeddings") is not None:
        fields["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    if params.get("truncate") is not None:
        fields["truncate"] = bool(params["truncate"])
    return RopeConfig(**fields)


def config_from_hf(hf: Any) -> ModelConfig:
    """Our ModelConfig from a transformers `PretrainedConfig`; unsupported features raise."""
    arch = getattr(hf, "model_type", None)
    if arch not in SUPPORTED:
        raise UnsupportedArchitectureError(
            f"model_type {arch!r} is not supported; hylo_jax imports {list(SUPPORTED)}")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"hidden_act {hf.hidden_act!r}: only SwiGLU (silu) MLPs")
    if getattr(hf, "mlp_bias", False):
        raise UnsupportedArchitectureError("mlp_bias=True is not supported")
    if arch == "llama" and getattr(hf, "attention_bias", False):
        raise UnsupportedArchitectureError("Llama with attention_bias=True (o_proj bias) is not supported")
    if getattr(hf, "use_sliding_window", False):
        raise UnsupportedArchitectureError("sliding-window attention is not supported")
    heads = hf.num_attention_heads
    return ModelConfig(
        arch=arch,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        rms_norm_eps=float(hf.rms_norm_eps),
        max_position_embeddings=hf.max_position_embeddings,
        rope=rope_from_hf(getattr(hf, "rope_parameters", None)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(getattr(hf, "attention_bias", False)),
        qk_norm=arch == "qwen3",
    )


# ---------------------------------------------------------------------------------------------
# Parameter names and layouts.

def hf_name(path: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """HF tensor name of our parameter path and the layout change from HF to ours."""
    stem, _, leaf = path.rpartition(".")
    if leaf == "kernel":
        return f"{stem}.weight", np.transpose
    if leaf in ("scale", "embedding"):
        return f"{stem}.weight", lambda x: x
    return path, lambda x: x


def load_params(abstract: nnx.State, source: TensorSource, shardings: nnx.State,
                *, rename: Callable[[str], tuple[str, Callable]] = hf_name,
                allow_unused: tuple[str, ...] = ()) -> nnx.State:
    """Fills an abstract parameter state from `source`, one tensor at a time, onto its sharding.

    Raises `CheckpointError` naming every missing tensor, shape mismatch, or unused tensor.
    """
    flat_abs = dict(nnx.to_flat_state(abstract))
    flat_shard = dict(nnx.to_flat_state(shardings))
    available = source.names()
    used, missing, filled = set(), [], {}
    for path, var in flat_abs.items():
        ours = path_str(path)
        name, transform = rename(ours)
        if name not in available:
            missing.append(name)
            continue
        array = transform(source.get(name))
        if tuple(array.shape) != tuple(var.shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(array.shape)} after layout "
                                  f"change, but {ours} expects {tuple(var.shape)}")
        sharding = flat_shard[path]
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        value = jax.device_put(np.asarray(array).astype(var.dtype), sharding)
        filled[path] = var.replace(value=value)
        used.add(name)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s): {missing[:8]}")
    unused = sorted(n for n in available - used
                    if not n.endswith(IGNORED_SUFFIXES) and n not in allow_unused)
    if unused:
        raise CheckpointError(f"checkpoint has {len(unused)} tensor(s) the model does not use: "
                              f"{unused[:8]}")
    return nnx.from_flat_state(filled)


def abstract_model(spec: ModelSpec | ModelConfig):
    """(graphdef, abstract parameter state) of a model, without allocating it."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec(spec)
    return nnx.split(nnx.eval_shape(lambda: spec.build(nnx.Rngs(0))))


def build_from_source(cfg: ModelConfig, source: TensorSource, mesh: jax.sharding.Mesh) -> CausalLM:
    """A teacher with parameters from `source`, placed on `mesh`."""
    check_mesh(cfg, mesh)
    graphdef, abstract = abstract_model(cfg)
    shardings = state_shardings(abstract, mesh)
    allow = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    return nnx.merge(graphdef, load_params(abstract, source, shardings, allow_unused=allow))


# ---------------------------------------------------------------------------------------------
# Entry points.

def load_hf_model(src: str | Path | Any, mesh: jax.sharding.Mesh, **overrides: Any
                  ) -> tuple[CausalLM, ModelConfig]:
    """Imports a teacher from a HF folder, a GGUF file, or an in-memory transformers model.

    `overrides` replace ModelConfig fields (e.g. dtype="bfloat16", remat="full").
    """
    from hylo_jax.config import replace

    if isinstance(src, (str, Path)):
        path = Path(src)
        gguf = find_gguf(path)
        if gguf is not None:
            src = load_gguf_torch(gguf)
        else:
            hf_cfg = _read_hf_config(path)
            cfg = replace(config_from_hf(hf_cfg), **overrides)
            return build_from_source(cfg, open_folder(path), mesh), cfg
    if hasattr(src, "state_dict") and hasattr(src, "config"):
        cfg = replace(config_from_hf(src.config), **overrides)
        return build_from_source(cfg, StateDictSource(src.state_dict()), mesh), cfg
    raise CheckpointError(f"cannot import {type(src).__name__}: give a folder, a .gguf file or a "
                          "transformers model")


def _read_hf_config(folder: Path):
    import transformers

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json (is it a Hugging Face model folder?)")
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except ValueError as e:  # unknown model_type
        raise UnsupportedArchitectureError(f"{folder}/config.json: {e}") from e


def load_gguf_torch(gguf: Path):
    """A transformers model dequantised from a GGUF file (offline)."""
    import transformers

    log.info("dequantising %s through transformers", gguf)
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True, dtype="float32")
    except ValueError as e:
        raise UnsupportedArchitectureError(f"{gguf}: {e}") from e


def hf_tokenizer(path: Path):
    """The tokenizer of a HF folder or GGUF file, or None if it has none."""
    import transformers

    gguf = find_gguf(path)
    try:
        if gguf is not None:
            return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              local_files_only=True)
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        log.warning("no tokenizer found beside %s (%s)", path, e)
        return None
