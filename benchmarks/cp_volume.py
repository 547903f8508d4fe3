"""Context-parallel communication per step, from shapes only (no devices): HyLo student vs its teacher.

    python benchmarks/cp_volume.py [--config configs/hylo-llama-1b-8mla8.yaml] [--tokens 1048576] [--shards 16]

Prints bytes received per device for one forward pass of one row (see hylo_jax/parallel/volume.py):
MLA's latent all-gather (= ring volume, in S-1 overlapped messages), what gathering MLA's decompressed
K/V would cost, the Llama-style K/V all-gather of the teacher, and the linear layers' state summaries.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hylo_jax.cli import _shape_spec  # noqa: E402
from hylo_jax.config import load_yaml  # noqa: E402
from hylo_jax.models.hybrid import ModelSpec  # noqa: E402
from hylo_jax.parallel.volume import table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "hylo-llama-1b-8mla8.yaml"))
    ap.add_argument("--tokens", type=int, default=2**20)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--dtype-bytes", type=int, default=2)
    args = ap.parse_args()
    spec = _shape_spec(load_yaml(args.config), args.config)
    print(table(spec, ModelSpec(spec.model), tokens=args.tokens, shards=args.shards, dtype_bytes=args.dtype_bytes))
    print("\nA training step moves ~3x this with full remat (forward, recomputed forward, backward "
          "transposes: reduce-scatter / reverse ring of the cotangents).")


if __name__ == "__main__":
    main()
