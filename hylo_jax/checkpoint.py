"""Model checkpoints on disk: resolved config (YAML), parameters (orbax), tokenizer (HF files).

Layout of a model folder (`hylo import`, `hylo upcycle`):
  DIR/config.yaml   {"model": ModelConfig, "hybrid": HybridConfig or absent, "source": origin}
  DIR/params/       orbax checkpoint of the parameter state (pure dict)
  DIR/tokenizer/    transformers tokenizer files, when one was available
Parameters restore directly onto the shardings of any mesh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from hylo_jax.config import ModelConfig, from_dict, load_yaml, save_yaml, to_dict
from hylo_jax.convert.hf import abstract_model
from hylo_jax.errors import CheckpointError
from hylo_jax.models.hybrid import HybridConfig, ModelSpec
from hylo_jax.models.transformer import CausalLM
from hylo_jax.sharding import state_shardings


def save_model(directory: str | Path, model: nnx.Module, spec: ModelSpec | ModelConfig, *,
               tokenizer=None, source: str = "") -> Path:
    """Writes config, parameters and tokenizer; refuses to overwrite existing parameters."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec(spec)
    directory = Path(directory).absolute()
    if (directory / "params").exists():
        raise CheckpointError(f"{directory}/params exists; choose a new --out folder")
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model": to_dict(spec.model), "source": source}
    if spec.hybrid is not None:
        config["hybrid"] = to_dict(spec.hybrid)
    primary = jax.process_index() == 0  # small files from process 0; orbax saves collectively
    if primary:
        save_yaml(config, directory / "config.yaml")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / "params", params)
    if tokenizer is not None and primary:
        tokenizer.save_pretrained(str(directory / "tokenizer"))
    return directory


def read_spec(directory: str | Path) -> ModelSpec:
    """The architecture stored in a model folder."""
    directory = Path(directory)
    if not (directory / "config.yaml").is_file():
        raise CheckpointError(f"{directory} is not a hylo_jax model folder (no config.yaml)")
    data: dict[str, Any] = load_yaml(directory / "config.yaml")
    if "model" not in data:
        raise CheckpointError(f"{directory}/config.yaml has no 'model' section")
    hybrid = data.get("hybrid")
    return ModelSpec(from_dict(ModelConfig, data["model"], "model"),
                     None if hybrid is None else from_dict(HybridConfig, hybrid, "hybrid"))


def load_model(directory: str | Path, mesh: jax.sharding.Mesh, **overrides: Any
               ) -> tuple[CausalLM, ModelSpec]:
    """Restores a model folder onto `mesh`; `overrides` change compute fields (dtype, remat...)."""
    directory = Path(directory).absolute()
    spec = read_spec(directory).with_overrides(**overrides)
    spec.check_mesh(mesh)
    graphdef, abstract = abstract_model(spec)
    shardings = state_shardings(abstract, mesh)
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(abstract), nnx.to_pure_dict(shardings))
    if not (directory / "params").is_dir():
        raise CheckpointError(f"{directory} has no params/ folder")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(directory / "params", target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{directory}/params does not match its config.yaml: {e}") from e
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract), spec


def load_tokenizer(directory: str | Path):
    """The tokenizer saved beside a model, or None."""
    path = Path(directory) / "tokenizer"
    if not path.is_dir():
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_teacher(source: str, mesh: jax.sharding.Mesh, **overrides: Any):
    """(teacher model, tokenizer or None) from a hylo model folder, HF folder, GGUF or preset."""
    from hylo_jax.convert.hf import hf_tokenizer, load_hf_model
    from hylo_jax.presets import resolve

    if (Path(source) / "config.yaml").is_file():
        model, spec = load_model(source, mesh, **overrides)
        if spec.hybrid is not None:
            raise CheckpointError(f"{source} is a hybrid student, not a teacher")
        return model, load_tokenizer(source)
    path = resolve(source)
    model, _ = load_hf_model(path, mesh, **overrides)
    return model, hf_tokenizer(path)
