"""Import Hugging Face Llama / Qwen2 / Qwen3 checkpoints (and hybrids written by `hylo export`)
into hylo_jax parameters; the config mapping both ways.

Names map one to one: our path `model.layers.3.self_attn.q_proj.kernel` is HF's
`model.layers.3.self_attn.q_proj.weight` transposed; `scale` and `embedding` are HF's `weight`.
Each tensor is read, checked, cast and placed on its sharding before the next is read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np
from flax import nnx

from hylo_jax.config import ModelConfig, RopeConfig, from_dict, to_dict
from hylo_jax.convert.sources import StateDictSource, TensorSource, find_gguf, open_folder
from hylo_jax.errors import CheckpointError, UnsupportedArchitectureError
from hylo_jax.models.gated_deltanet import GDNConfig
from hylo_jax.models.hybrid import LINEAR_KINDS, HybridConfig, ModelSpec
from hylo_jax.models.mamba2 import Mamba2Config
from hylo_jax.models.mla import MLAConfig
from hylo_jax.models.transformer import CausalLM
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


ROPE_KEYS = {"default": (), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings"),
             "yarn": ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
                      "original_max_position_embeddings", "truncate")}


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    """transformers' `rope_parameters` of our RopeConfig (the inverse of `rope_from_hf`)."""
    out = {"rope_type": rope.type, "rope_theta": rope.theta}
    out.update({k: getattr(rope, k) for k in ROPE_KEYS[rope.type] if getattr(rope, k) is not None})
    return out


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers config fields of a teacher (the inverse of `config_from_hf`)."""
    fields = dict(
        model_type=cfg.arch, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=rope_to_hf(cfg.rope), tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu")
    if cfg.arch != "qwen2":  # Qwen2's q/k/v biases are implied by its architecture
        fields["attention_bias"] = cfg.attention_bias
    return fields


# A hybrid exports as model_type "hylo_hybrid": the teacher's fields (its own model_type as
# `base_model_type`), `mixer_types` (each layer's kind) and one section per replaced mixer kind,
# holding that mixer's config without the JAX-only compute fields (MLA's rope as `rope_parameters`).
HYLO_MODEL_TYPE = "hylo_hybrid"
COMPUTE_ONLY = ("dtype", "param_dtype", "attention_impl", "max_segments", "decode_impl", "impl")
MIXER_CONFIGS = {"mla": MLAConfig, "gdn": GDNConfig, "mamba2": Mamba2Config}


def spec_to_hf(spec: ModelSpec) -> dict[str, Any]:
    """The config.json fields of a teacher or a plan without replaced layers (the native model_type),
    or of a hybrid (hylo_hybrid)."""
    fields = config_to_hf(spec.model)
    kinds = spec.layer_kinds()
    if set(kinds) == {"attention"}:  # no replaced layer: the teacher's own architecture
        return fields
    fields.update(model_type=HYLO_MODEL_TYPE, base_model_type=spec.model.arch, mixer_types=kinds,
                  attention_bias=spec.model.attention_bias, qk_norm=spec.model.qk_norm)
    for kind in sorted(set(kinds) & set(MIXER_CONFIGS)):
        section = {k: v for k, v in to_dict(getattr(spec.hybrid, kind)).items() if k not in COMPUTE_ONLY}
        if kind == "mla":
            section["rope_parameters"] = rope_to_hf(spec.hybrid.mla.rope)
            del section["rope"]
        fields[kind] = section
    return fields


def spec_from_hf(hf: Any) -> ModelSpec:
    """The ModelSpec of a transformers config: a teacher, or a hybrid exported by `hylo export`."""
    if getattr(hf, "model_type", None) != HYLO_MODEL_TYPE:
        return ModelSpec(config_from_hf(hf))
    fields = hf.to_dict() if hasattr(hf, "to_dict") else dict(vars(hf))
    model = config_from_hf(SimpleNamespace(**{**fields, "model_type": fields["base_model_type"]}))
    kinds = list(fields["mixer_types"])
    unknown = sorted(set(kinds) - {"attention", *MIXER_CONFIGS})
    if unknown:
        raise UnsupportedArchitectureError(f"mixer_types {unknown} are not hylo_jax layer kinds")
    sections, mla_rope = {}, None
    for kind in sorted(set(kinds) & set(MIXER_CONFIGS)):
        section = dict(fields[kind])
        if kind == "mla":
            mla_rope = rope_from_hf(section.pop("rope_parameters"))
        sections[kind] = from_dict(MIXER_CONFIGS[kind], section, f"config.json {kind}")
    linear = [k for k in kinds if k in LINEAR_KINDS]
    if len(set(linear)) > 1:
        raise UnsupportedArchitectureError(f"mixer_types mixes linear kinds {sorted(set(linear))}")
    plan = HybridConfig(
        mla_layers=tuple(i for i, k in enumerate(kinds) if k == "mla"),
        attention_layers=tuple(i for i, k in enumerate(kinds) if k == "attention"),
        linear=linear[0] if linear else "gdn",
        mla_rope=None if mla_rope == model.rope else mla_rope, **sections)
    return ModelSpec.create(model, plan)


# ---------------------------------------------------------------------------------------------
# Parameter names and layouts.

Layout = Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def hf_layout(path: str) -> tuple[str, Layout, Layout]:
    """HF tensor name of our parameter path, the layout change HF -> ours, and ours -> HF.

    Linear `kernel` [in, out] = `weight` [out, in] transposed; a convolution's `kernel` [K, C]
    (`*conv1d`) = PyTorch Conv1d `weight` [C, 1, K]; `scale`, `embedding` = `weight`.
    """
    stem, _, leaf = path.rpartition(".")
    if leaf == "kernel" and stem.endswith("conv1d"):
        return f"{stem}.weight", lambda w: np.transpose(w[:, 0, :]), lambda k: np.transpose(k)[:, None, :]
    if leaf == "kernel":
        return f"{stem}.weight", np.transpose, np.transpose
    if leaf in ("scale", "embedding"):
        return f"{stem}.weight", _same, _same
    return path, _same, _same


def hf_name(path: str) -> tuple[str, Layout]:
    """HF tensor name of our parameter path and the layout change from HF to ours."""
    name, to_ours, _ = hf_layout(path)
    return name, to_ours


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


def build_from_source(spec: ModelSpec | ModelConfig, source: TensorSource, mesh: jax.sharding.Mesh
                      ) -> CausalLM:
    """A model (teacher or hybrid) with parameters from `source`, placed on `mesh`."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec(spec)
    spec.check_mesh(mesh)
    graphdef, abstract = abstract_model(spec)
    shardings = state_shardings(abstract, mesh)
    allow = ("lm_head.weight",) if spec.model.tie_word_embeddings else ()
    return nnx.merge(graphdef, load_params(abstract, source, shardings, allow_unused=allow))


# ---------------------------------------------------------------------------------------------
# Entry points.

def load_hf(src: str | Path | Any, mesh: jax.sharding.Mesh, **overrides: Any) -> tuple[CausalLM, ModelSpec]:
    """Imports a HF folder (a teacher or an exported hybrid), a GGUF file, or an in-memory
    transformers model. `overrides` replace ModelConfig fields (e.g. dtype="bfloat16", remat="full").
    """
    if isinstance(src, (str, Path)):
        path = Path(src)
        gguf = find_gguf(path)
        if gguf is not None:
            src = load_gguf_torch(gguf)
        else:
            spec = spec_from_hf(_read_hf_config(path)).with_overrides(**overrides)
            return build_from_source(spec, open_folder(path), mesh), spec
    if hasattr(src, "state_dict") and hasattr(src, "config"):
        spec = spec_from_hf(src.config).with_overrides(**overrides)
        return build_from_source(spec, StateDictSource(src.state_dict()), mesh), spec
    raise CheckpointError(f"cannot import {type(src).__name__}: give a folder, a .gguf file or a "
                          "transformers model")


def load_hf_model(src: str | Path | Any, mesh: jax.sharding.Mesh, **overrides: Any
                  ) -> tuple[CausalLM, ModelConfig]:
    """Imports a teacher (see `load_hf`); a hybrid is a `CheckpointError`."""
    model, spec = load_hf(src, mesh, **overrides)
    if spec.hybrid is not None:
        raise CheckpointError(f"{src} is a hylo hybrid, not a teacher")
    return model, spec.model


def _special_floats(obj: dict) -> Any:
    """transformers writes inf / nan in config.json as {"__float__": "Infinity"}: decode them."""
    return float(obj["__float__"]) if set(obj) == {"__float__"} else obj


def _read_hf_config(folder: Path):
    import transformers

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json (is it a Hugging Face model folder?)")
    fields = json.loads((folder / "config.json").read_text(), object_hook=_special_floats)
    if fields.get("model_type") == HYLO_MODEL_TYPE:  # read as data: no remote code runs
        return SimpleNamespace(**fields)
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
        # An exported hybrid's folder names remote code for the model, never for the tokenizer.
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                          trust_remote_code=False)
    except (OSError, ValueError) as e:
        log.warning("no tokenizer found beside %s (%s)", path, e)
        return None
