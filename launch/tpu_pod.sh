#!/usr/bin/env bash
# Run the same `hylo` command on every worker of a Cloud TPU pod slice (multi-host).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh train --config configs/hylo-llama-1b-8mla8.yaml \
#       mesh.fsdp=-1 mesh.sequence=4 teacher=/mnt/disks/llama-3.2-1b
#
# Every worker runs the command in REPO (cloned and installed there beforehand, e.g. with
# `--command "git clone ... && pip install -e ."`). jax.distributed.initialize() finds the other
# workers through the TPU VM metadata (HYLO_DISTRIBUTED=1 turns that on), each host reads its own
# rows of the global batch, only worker 0 writes logs, and orbax checkpoints collectively: OUT and
# the data must be on storage every worker sees (a GCS bucket through gcsfuse, or Filestore).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-hylo_jax}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" $PROJECT_FLAG --worker=all \
  --command "cd $REPO && HYLO_DISTRIBUTED=1 python3 -m hylo_jax.cli${ARGS} 2>&1 | tee -a hylo-\$(hostname).log"
