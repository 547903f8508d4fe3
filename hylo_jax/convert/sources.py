"""Tensor sources: lazy, name-addressed readers of PyTorch / Hugging Face weights.

Each source yields one tensor at a time as a NumPy array (bf16 via ml_dtypes), so importing a
model holds about one copy of the weights in host memory.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from hylo_jax.errors import CheckpointError


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as a NumPy array without an fp32 detour for bf16."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class TensorSource(abc.ABC):
    """Name -> tensor mapping read on demand."""

    @abc.abstractmethod
    def names(self) -> set[str]:
        """All tensor names."""

    @abc.abstractmethod
    def get(self, name: str) -> np.ndarray:
        """One tensor, read now."""


class StateDictSource(TensorSource):
    """An in-memory PyTorch state dict (or a module's)."""

    def __init__(self, state_dict: Mapping[str, object]):
        self._sd = state_dict

    def names(self) -> set[str]:
        return set(self._sd)

    def get(self, name: str) -> np.ndarray:
        value = self._sd[name]
        return value if isinstance(value, np.ndarray) else torch_to_numpy(value)


class SafetensorsSource(TensorSource):
    """One `.safetensors` file or a sharded set described by `model.safetensors.index.json`."""

    def __init__(self, files: dict[str, Path]):
        self._where = files  # tensor name -> file
        self._handles: dict[Path, object] = {}

    @classmethod
    def from_folder(cls, folder: Path) -> SafetensorsSource:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: folder / f for name, f in weight_map.items()}
            for f in set(files.values()):
                if not f.is_file():
                    raise CheckpointError(f"{index} names shard {f.name}, which is missing")
            return cls(files)
        single = folder / "model.safetensors"
        return cls({name: single for name in cls._open(single).keys()})

    @staticmethod
    def _open(path: Path):
        from safetensors import safe_open

        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        path = self._where[name]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        try:
            return torch_to_numpy(self._handles[path].get_tensor(name))
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}") from e


class TorchBinSource(TensorSource):
    """`pytorch_model.bin` (or its sharded index), loaded with `torch.load(weights_only=True)`."""

    def __init__(self, folder: Path):
        import torch

        index = folder / "pytorch_model.bin.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
                 if index.is_file() else ["pytorch_model.bin"])
        self._sd = {}
        for f in files:
            try:
                self._sd.update(torch.load(folder / f, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:
                raise CheckpointError(f"cannot read {folder / f}: {e}") from e

    def names(self) -> set[str]:
        return set(self._sd)

    def get(self, name: str) -> np.ndarray:
        return torch_to_numpy(self._sd[name])


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` is, or the single one inside folder `path`."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise CheckpointError(f"{path} holds several GGUF files {[f.name for f in found]}; name one")
        return found[0] if found else None
    return None


def open_folder(folder: Path) -> TensorSource:
    """The tensor source of a Hugging Face model folder (safetensors, then pytorch_model.bin)."""
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return SafetensorsSource.from_folder(folder)
    if (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        return TorchBinSource(folder)
    raise CheckpointError(f"{folder} holds no model.safetensors(.index.json) or pytorch_model.bin")
