#!/usr/bin/env bash
# One device call, several benchmarks, each under its own time limit and all under CAP seconds, so that what
# ran comes back even when the call's limit cuts the rest. Logs go to $OUT/<step>.log (the device tool returns
# them); the tail of each is printed. Run from the repository root on the device machine:
#   CAP=560 bash benchmarks/device_batch.sh            # the default steps below (probe: each Mosaic kernel
#                                                       # set alone under a time limit, mosaic_probe.py)
#   CAP=300 bash benchmarks/device_batch.sh check distill
#   CAP=560 bash benchmarks/device_batch.sh peers       # ours (Mosaic) vs jla, fla, mamba_ssm in one run; the
#                                                       # Triton peers tune themselves first (minutes)
# The peers' pure-Python wheels (jax-linear-attention, equinox, wadler-lindig, fla-core, mamba-ssm) are
# installed from .whl/ when it is there (carry it: benchmarks/README.md). check.log also has the device's ptxas
# report of every Mosaic kernel (registers, spills), to set beside `kernel_resources.py`'s from a CPU machine.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device_batch}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
nvidia-smi --query-gpu=name --format=csv,noheader
T0=$SECONDS

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 left; shift 2
  left=$(( ${CAP:-560} - SECONDS + T0 ))
  if (( left < 30 )); then echo "== $name: skipped (time cap)"; return; fi
  (( limit > left )) && limit=$left
  echo "== $name (limit $limit s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc $? at $(( SECONDS - T0 )) s"
  grep -v "^WARNING\|^I0000\|^W0000" "$OUT/$name.log" | tail -"${TAIL:-16}"
}

declare -A STEPS=(
  [probe]="240 python3 benchmarks/mosaic_probe.py --shapes 1x1024 --cases gdn_fwd,gdn_train,gdn_reverse,gdn_gradients,gdn_grad,ssd_g32n64_grad --limit 40"
  [check]="150 env MOSAIC_GPU_DUMP_PTXAS=1 python3 benchmarks/kernels.py --check --check-kernels mosaic --check-shape 2x1000"
  [kernels]="180 python3 benchmarks/kernels.py --skip chunked,auto,fla,mamba --shapes 4x4096,1x16384"
  [gcheck]="120 python3 benchmarks/kernels.py --only gdn --check --check-kernels mosaic --check-shape 2x1000"
  [gcheck4]="120 python3 benchmarks/kernels.py --only gdn --check --check-kernels mosaic --check-shape 4x1000"
  [gprof4]="120 python3 benchmarks/profile_ops.py gdn --shape 4x4096 --fwd --top 10"
  [gkern]="150 python3 benchmarks/kernels.py --only gdn --skip chunked,auto,pallas,fla --shapes 4x4096,1x16384"
  [factors]="150 python3 benchmarks/gdn_factors.py --shapes 4x4096,1x16384"
  [factors4]="70 python3 benchmarks/gdn_factors.py --shapes 4x4096"
  [gvb64]="200 python3 benchmarks/kernels.py --only gdn --skip chunked,auto,pallas,fla,jla --shapes 1x16384 --gdn-value-block 64"
  [gvb32]="100 python3 benchmarks/kernels.py --only gdn --skip chunked,auto,pallas,fla,jla --shapes 4x4096 --gdn-value-block 32"
  [gkern4]="100 python3 benchmarks/kernels.py --only gdn --skip chunked,auto,pallas,fla --shapes 4x4096"
  [sprobe]="200 python3 benchmarks/mosaic_probe.py --shapes 4x4096 --cases ssd_g32n64_grad,ssd_g1n128_grad --limit 90"
  [glong]="200 python3 benchmarks/kernels.py --only gdn --skip chunked,auto,pallas,fla --shapes 1x16384,1x65536"
  [slong]="160 python3 benchmarks/kernels.py --only ssd --skip chunked,auto,pallas,mamba --shapes 1x16384,1x65536"
  [s16]="100 python3 benchmarks/kernels.py --only ssd --skip chunked,auto,pallas,mamba --shapes 1x16384"
  [skern4]="100 python3 benchmarks/kernels.py --only ssd --skip chunked,auto,pallas,mamba --shapes 4x4096"
  [accuracy]="300 python3 benchmarks/accuracy.py --skip pallas,auto --shapes 4x4096"
  [saccuracy]="200 python3 benchmarks/accuracy.py --only ssd --variants g1n128 --skip pallas,auto,chunked --shapes 4x4096"
  [peers]="420 python3 benchmarks/kernels.py --skip chunked,auto,pallas --shapes 4x4096"
  [gends]="200 python3 benchmarks/kernels.py --only gdn --skip chunked,auto,pallas,fla --shapes 4x4096,1x65536"
  [gacc]="150 python3 benchmarks/accuracy.py --only gdn --skip pallas,auto,chunked,fla"
  [gdocs]="180 python3 benchmarks/kernels.py --only gdn --skip chunked,auto,pallas,fla --shapes 4x4096,1x16384 --gdn-docs 1"
  [gfla]="300 python3 benchmarks/kernels.py --only gdn --skip chunked,auto,pallas --shapes 4x4096"
  [profile]="90 python3 benchmarks/profile_ops.py gdn --shape 4x4096 --top 20"
  [gprof]="120 python3 benchmarks/profile_ops.py gdn --shape 4x4096 --fwd --sources --top 15"
  [gprofb]="150 python3 benchmarks/profile_ops.py gdn --shape 4x4096 --sources --top 20"
  [jprof]="100 python3 benchmarks/profile_ops.py gdn --shape 4x4096 --impl jla --fwd --top 12"
  [jprofb]="120 python3 benchmarks/profile_ops.py gdn --shape 4x4096 --impl jla --top 15"
  [sprof]="90 python3 benchmarks/profile_ops.py ssd --shape 1x16384 --variant g1n128 --fwd --top 12"
  [sprofj]="90 python3 benchmarks/profile_ops.py ssd --shape 1x16384 --variant g1n128 --fwd --impl jla --top 12"
  [distill]="170 python3 benchmarks/distill_step.py --seq 8192 --remat none --kl chunked"
  [rows2]="170 python3 benchmarks/distill_step.py --seq 8192 --remat none --kl chunked --batch 2"
  [accum]="200 python3 benchmarks/distill_step.py --seq 8192 --remat none --kl chunked --batch 4 --accum 4"
  [accum2]="200 python3 benchmarks/distill_step.py --seq 8192 --remat none --kl chunked --batch 4 --accum 2"
  [mdistill]="170 env HYLO_GPU_KERNELS=mosaic python3 benchmarks/distill_step.py --seq 8192 --remat none --kl chunked"
  [packed]="170 python3 benchmarks/distill_step.py --seq 8192 --remat none --docs 8"
)
for name in "${@:-probe kernels profile distill}"; do
  for one in $name; do
    [[ -n "${STEPS[$one]:-}" ]] || { echo "unknown step $one (${!STEPS[*]})"; exit 2; }
    read -r limit cmd <<< "${STEPS[$one]}"
    # shellcheck disable=SC2086
    step "$one" "$limit" $cmd
  done
done
