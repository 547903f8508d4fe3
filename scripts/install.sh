#!/usr/bin/env bash
# Creates .venv with the pinned stack, the offline demo assets and hylo_jax itself (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-demo.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "installed: $(.venv/bin/python -c 'import jax, flax, hylo_jax; print("jax", jax.__version__, "flax", flax.__version__, "hylo_jax", hylo_jax.__version__)')"
