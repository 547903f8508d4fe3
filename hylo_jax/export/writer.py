"""Hugging Face model folders from hylo_jax models (`hylo export`).

A folder holds config.json (`convert.hf.spec_to_hf`), model.safetensors (or shards of at most
`max_shard_size` bytes plus model.safetensors.index.json), generation_config.json, the tokenizer
files, and for a hybrid the PyTorch implementation (configuration_hylo.py, modeling_hylo.py) named
in config.json's `auto_map`; a plan without replaced layers is a native Llama / Qwen2 / Qwen3 folder.
Tensor names and layouts are `convert.hf.hf_layout`'s, so `hylo import` is the inverse.

Parameters are gathered one at a time (`jax.device_get`, or an all-gather across processes) and
written shard by shard, so host memory holds at most one shard. Everything is written into a
temporary folder beside the target, renamed at the end; on any error it is removed.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from hylo_jax.convert.hf import HYLO_MODEL_TYPE, hf_layout, spec_to_hf
from hylo_jax.errors import CheckpointError, ConfigError
from hylo_jax.models.hybrid import ModelSpec
from hylo_jax.models.transformer import CausalLM
from hylo_jax.sharding import path_str

EXPORT_DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_SHARD_SIZE = 5 * 2**30
MODELING_FILES = ("configuration_hylo.py", "modeling_hylo.py")
AUTO_MAP = {"AutoConfig": "configuration_hylo.HyloConfig",
            "AutoModelForCausalLM": "modeling_hylo.HyloForCausalLM"}
NATIVE_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def check_exportable(spec: ModelSpec, dtype: str) -> None:
    """`ConfigError` unless the dtype is one we write and modeling_hylo implements every layer kind."""
    from hylo_jax.export.modeling_hylo import MIXERS

    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype {dtype!r} is not supported; choose one of {list(EXPORT_DTYPES)}")
    missing = sorted(set(spec.layer_kinds()) - set(MIXERS))
    if missing:
        raise ConfigError(f"layer kinds {missing} have no PyTorch implementation in modeling_hylo.py "
                          f"(it implements {sorted(MIXERS)})")


def plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive groups of tensor indices, each at most `max_bytes` (a bigger tensor stands alone)."""
    shards, total = [[]], 0
    for i, size in enumerate(sizes):
        if shards[-1] and total + size > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += size
    return shards


def gather(value: jax.Array) -> np.ndarray:
    """One parameter, whole, on this host: `device_get`, or an all-gather across processes."""
    if value.is_fully_addressable:
        return np.asarray(jax.device_get(value))
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def write_tensors(model: CausalLM, folder: Path | None, dtype: str, max_shard_size: int) -> None:
    """Streams the parameters into safetensors shards in `folder` (None: only take part in gathers)."""
    import torch
    from safetensors.torch import save_file

    entries = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, _, to_hf = hf_layout(path_str(path))
        entries.append((name, var, to_hf))
    torch_dtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards = plan_shards([math.prod(var.shape) * itemsize for _, var, _ in entries], max_shard_size)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        tensors = {}
        for name, var, to_hf in (entries[i] for i in shard):
            array = to_hf(gather(var.get_value()).astype(np.float32))
            tensors[name] = torch.from_numpy(np.ascontiguousarray(array)).to(torch_dtype)
            total += tensors[name].numel() * itemsize
        if folder is not None:
            save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    if folder is not None and len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def hf_config(spec: ModelSpec, dtype: str, tokenizer=None):
    """The transformers config object: the native class for a teacher, HyloConfig for a hybrid."""
    import transformers

    from hylo_jax.export.configuration_hylo import HyloConfig

    fields = spec_to_hf(spec)
    model_type = fields.pop("model_type")
    tokens = {} if tokenizer is None else {
        f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    if model_type != HYLO_MODEL_TYPE:
        config = transformers.AutoConfig.for_model(model_type, **fields, **tokens, dtype=dtype)
        config.architectures = [NATIVE_CLASSES[model_type]]
        return config
    config = HyloConfig(**fields, **tokens, dtype=dtype)
    config.architectures = ["HyloForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    return config


def save_hf(model: CausalLM, spec: ModelSpec, out: str | Path, *, tokenizer=None, dtype: str = "float32",
            max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Writes the Hugging Face folder `out` (which must not exist); returns its path."""
    import transformers

    check_exportable(spec, dtype)
    out = Path(out).absolute()
    if out.exists():
        raise CheckpointError(f"{out} exists; choose a new --out folder")
    if jax.process_index() != 0:  # other hosts only take part in the gathers
        write_tensors(model, None, dtype, max_shard_size)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        config = hf_config(spec, dtype, tokenizer)
        config.save_pretrained(str(tmp))
        transformers.GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        if config.model_type == HYLO_MODEL_TYPE:
            for name in MODELING_FILES:
                shutil.copyfile(Path(__file__).with_name(name), tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_tensors(model, tmp, dtype, max_shard_size)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_checkpoint(ckpt: str | Path, out: str | Path, mesh: jax.sharding.Mesh, **kwargs) -> Path:
    """`save_hf` of a hylo_jax model folder restored onto `mesh` (parameters stay sharded)."""
    from hylo_jax.checkpoint import load_model, load_tokenizer, read_spec

    check_exportable(read_spec(ckpt), kwargs.get("dtype", "float32"))
    model, spec = load_model(ckpt, mesh)
    return save_hf(model, spec, out, tokenizer=load_tokenizer(ckpt), **kwargs)
